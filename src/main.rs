fn main() {
    let cli = hayloft::cli::Cli::parse_args();
    if let Err(e) = hayloft::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
