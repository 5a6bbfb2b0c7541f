fn main() {
    let cli = hayloft::cli::Cli::parse_args();
    if let Err(e) = hayloft::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The program's allocator (set here, not in the library, so a test binary may install its own): mimalloc instead
/// of glibc's malloc, for its huge pages. The repacked weights and the KV blocks are read once per decoded token; glibc
/// left them on 4 KiB pages, and under the common `transparent_hugepage=madvise` setting a process gets 2 MiB pages
/// only where it asks, which mimalloc does for its segments. README.md, "Huge pages", has the measurements.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
