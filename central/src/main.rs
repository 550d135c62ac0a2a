fn main() {
    eprintln!("bench-central is not built yet");
    std::process::exit(1);
}
