fn main() -> std::process::ExitCode {
    zone_ingress::cli::main()
}
