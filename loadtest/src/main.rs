//! `wakewire-loadtest`: fleet simulator and benchmark harness (see
//! `docs/benchmarks.md`). Placeholder until the load-test issue lands.

fn main() {
    eprintln!("wakewire-loadtest: not implemented yet; see the load-test issue");
    std::process::exit(2);
}
