//! `include/embar.h` is what cbindgen generates from `src/lib.rs` with `cbindgen.toml`: a
//! stale header is regenerated, and the test fails so that the new one is reviewed and
//! committed.

#[test]
fn the_checked_in_header_is_what_cbindgen_generates() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config =
        cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(format!("{dir}/src/lib.rs"))
        .generate()
        .expect("cbindgen reads src/lib.rs")
        .write(&mut generated);
    let path = format!("{dir}/include/embar.h");
    let current = std::fs::read(&path).unwrap_or_default();
    if current != generated {
        std::fs::write(&path, &generated).expect("include/embar.h is writable");
        panic!("{path} was stale and is regenerated: review and commit it");
    }
}
