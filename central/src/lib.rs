//! bench-central: dispatches jobs, indexes results from JetStream, serves the REST API, the
//! SSE bridge and the web UI. (Being built: see the central issue.)
