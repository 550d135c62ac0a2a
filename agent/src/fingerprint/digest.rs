//! A model file's content digest (`sha256:<hex>`), for engines that name a local weights file
//! (llama.cpp `/props` `model_path`) but no digest. Hashing reads the whole file once (about
//! 1-2 s per GB); the answer is kept per (path, size, modification time), so a job only pays
//! it the first time a file is seen, before its first run and outside every measurement.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

type Key = (PathBuf, u64, Option<SystemTime>);

static CACHE: Mutex<Option<HashMap<Key, String>>> = Mutex::new(None);

fn key(path: &Path) -> std::io::Result<Key> {
    let meta = std::fs::metadata(path)?;
    Ok((path.to_path_buf(), meta.len(), meta.modified().ok()))
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("sha256:{hex}"))
}

/// The digest of the file at `path`, from the cache when the file is unchanged. Runs on the
/// blocking pool; the error says why the file could not be read (not on this machine, no
/// permission).
pub async fn file_sha256(path: PathBuf) -> Result<String, String> {
    tokio::task::spawn_blocking(move || {
        let k = key(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(d) = CACHE
            .lock()
            .expect("digest cache lock")
            .as_ref()
            .and_then(|c| c.get(&k))
        {
            return Ok(d.clone());
        }
        let d = hash_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        CACHE
            .lock()
            .expect("digest cache lock")
            .get_or_insert_with(HashMap::new)
            .insert(k, d.clone());
        Ok(d)
    })
    .await
    .map_err(|e| format!("digest task failed: {e}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn digest_is_sha256_of_the_content_and_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, b"abc").unwrap();
        // sha256("abc"), FIPS 180-2 appendix B.1.
        let abc = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(file_sha256(p.clone()).await.unwrap(), abc);
        assert_eq!(file_sha256(p.clone()).await.unwrap(), abc, "cached");
        std::fs::write(&p, b"abcd").unwrap();
        assert_ne!(file_sha256(p.clone()).await.unwrap(), abc, "size changed");
        let err = file_sha256(dir.path().join("absent")).await.unwrap_err();
        assert!(err.contains("absent"), "{err}");
    }
}
