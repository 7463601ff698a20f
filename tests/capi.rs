//! The C ABI (`embar-capi`, libembar) from C: `capi/examples/pubsub.c` is compiled with the
//! system's `cc` against `capi/include/embar.h` and the shared library, and run against a
//! real cluster.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use embar_test_support::{cargo_build, output_within, serial, Cluster};

#[test]
fn the_c_example_publishes_and_receives_every_message_in_order() {
    let _serial = serial();
    let lib_dir = cargo_build(&["-p", "embar-capi"]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = std::env::temp_dir().join(format!("embar-pubsub-{}", std::process::id()));
    let cc = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&bin)
        .arg(root.join("capi/examples/pubsub.c"))
        .arg("-I")
        .arg(root.join("capi/include"))
        .arg("-L")
        .arg(&lib_dir)
        .arg("-lembar")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .output()
        .expect("cc runs");
    assert!(
        cc.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&cc.stderr)
    );

    let c = Cluster::up(
        "capi",
        &["--pool-bytes", "64MiB", "--segment-bytes", "1MiB"],
    );
    c.topic("c", &["--batch-bytes", "16KiB"]);
    let n = 5000;
    // The control address given, then found through the environment.
    let mut given = Command::new(&bin);
    given.args(["c", &n.to_string(), &c.control]);
    let mut found = Command::new(&bin);
    found
        .args(["c", &n.to_string()])
        .env_remove("EMBAR_CLUSTER_DIR")
        .env("EMBAR_CONTROL", &c.control);
    for (run, first) in [(given, 0), (found, n)] {
        let out = output_within(run, Duration::from_secs(60));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(&format!(
                "received {n} messages in order, total orders {first}..{}",
                first + n - 1
            )),
            "{text}"
        );
    }
    let _ = std::fs::remove_file(&bin);
}
