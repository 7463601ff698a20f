//! With feature `dpdk`: compiles the DPDK shim (dpdk/shim.c) against `pkg-config libdpdk`
//! and links DPDK's shared libraries (their poll-mode drivers load as plug-ins at run time).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_DPDK").is_none() {
        return;
    }
    dpdk();
}

#[cfg(feature = "dpdk")]
fn dpdk() {
    println!("cargo:rerun-if-changed=dpdk/shim.c");
    let lib = pkg_config::Config::new()
        .atleast_version("22.11")
        .probe("libdpdk")
        .unwrap_or_else(|e| {
            panic!("feature `dpdk` needs DPDK 22.11 or newer (Debian: apt install libdpdk-dev pkg-config): {e}")
        });
    let mut build = cc::Build::new();
    build.file("dpdk/shim.c").warnings(false).opt_level(2);
    for p in &lib.include_paths {
        build.include(p);
    }
    // pkg-config's other flags (`-include rte_config.h`, `-march=...`) as DPDK wants them.
    let cflags = std::process::Command::new("pkg-config")
        .args(["--cflags-only-other", "libdpdk"])
        .output()
        .expect("pkg-config runs");
    let cflags = String::from_utf8_lossy(&cflags.stdout).to_string();
    let mut words = cflags.split_ascii_whitespace();
    while let Some(w) = words.next() {
        if w == "-include" {
            if let Some(h) = words.next() {
                build.flag("-include").flag(h);
            }
        } else {
            build.flag(w);
        }
    }
    build.compile("embar_dpdk_shim");
}

#[cfg(not(feature = "dpdk"))]
fn dpdk() {}
