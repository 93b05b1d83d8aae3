fn main() -> std::process::ExitCode {
    loansync::cli::main()
}
