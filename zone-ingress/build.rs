//! Embeds the BPF object built by `cargo xtask build` (path in `ZONE_INGRESS_BPF_OBJ`).
//!
//! A plain `cargo build` (clippy, an IDE) without it still compiles: the agent then embeds an empty
//! object and, at run time, says it was built without BPF programs and uses the userspace datapath.
use std::path::PathBuf;

fn main() {
    println!("cargo::rerun-if-env-changed=ZONE_INGRESS_BPF_OBJ");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out.join("zone-ingress-ebpf.o");
    match std::env::var_os("ZONE_INGRESS_BPF_OBJ") {
        Some(src) => {
            let src = PathBuf::from(src);
            println!("cargo::rerun-if-changed={}", src.display());
            if let Err(e) = std::fs::copy(&src, &dest) {
                panic!(
                    "ZONE_INGRESS_BPF_OBJ={}: cannot copy it: {e}",
                    src.display()
                );
            }
        }
        None => {
            println!(
                "cargo::warning=ZONE_INGRESS_BPF_OBJ is not set: building without BPF programs \
                 (use `cargo xtask build`)"
            );
            std::fs::write(&dest, []).expect("write empty BPF object placeholder");
        }
    }
}
