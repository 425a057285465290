//! The command line's help and argument errors. (Being an integration test of
//! this package also makes `cargo test --workspace` build the `skiff` binary
//! that the end-to-end tests in `tests/` drive.)

use std::process::Command;

fn skiff(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(args)
        .output()
        .expect("skiff runs")
}

#[test]
fn help_lists_every_command() {
    let out = skiff(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for command in [
        "convert", "images", "stats", "export", "fsck", "rm", "gc", "--store",
    ] {
        assert!(
            help.contains(command),
            "--help does not mention {command}:\n{help}"
        );
    }
    let convert = String::from_utf8_lossy(&skiff(&["convert", "--help"]).stdout).into_owned();
    assert!(
        convert.contains("docker-archive:") && convert.contains("--platform"),
        "{convert}"
    );
}

#[test]
fn bad_arguments_fail_with_usage() {
    let out = skiff(&["convert", "oci:x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
}
