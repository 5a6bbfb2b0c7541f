use clap::Parser;

fn main() {
    let cli = hayloft::cli::Cli::parse();
    if let Err(e) = hayloft::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
