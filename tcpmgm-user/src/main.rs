//! The `tcpmgm` command; everything it does is in the library, `tcpmgm::cli` first.
fn main() -> std::process::ExitCode {
    tcpmgm::cli::main()
}
