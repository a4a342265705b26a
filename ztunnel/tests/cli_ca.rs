//! `ztunnel ca ...` as an operator runs it: files written, and bad files refused with
//! the file and the problem named and a non-zero exit.

use std::process::{Command, Output};

fn ztunnel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn init_then_issue() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let out = ztunnel(&[
        "ca",
        "init",
        "--dir",
        ca.to_str().unwrap(),
        "--trust-domain",
        "example.org",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let issued = dir.path().join("issued");
    let out = ztunnel(&[
        "ca",
        "issue",
        "--dir",
        ca.to_str().unwrap(),
        "--identity",
        "spiffe://example.org/ns/prod/sa/orders",
        "--out",
        issued.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let chain = std::fs::read(issued.join("cert-chain.pem")).unwrap();
    let der = pem::parse(chain).unwrap();
    let info = ztunnel::identity::CertificateInfo::parse(der.contents()).unwrap();
    assert_eq!(info.uris, ["spiffe://example.org/ns/prod/sa/orders"]);

    let again = ztunnel(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("root-key.pem"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn bad_ca_files_are_named_with_their_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let issue = |ca: &std::path::Path| {
        ztunnel(&[
            "ca",
            "issue",
            "--dir",
            ca.to_str().unwrap(),
            "--identity",
            "spiffe://cluster.local/ns/a/sa/b",
            "--out",
            d.join("out").to_str().unwrap(),
        ])
    };

    let missing = issue(&d.join("absent"));
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("absent/root-cert.pem")
            && stderr(&missing).contains("No such file")
    );

    let broken = d.join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(
        broken.join("root-cert.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA",
    )
    .unwrap();
    std::fs::write(broken.join("root-key.pem"), "not a key").unwrap();
    let out = issue(&broken);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("broken/root-key.pem")
            && stderr(&out).contains("not a PEM private key"),
        "{}",
        stderr(&out)
    );

    let unreadable = d.join("unreadable");
    std::fs::create_dir_all(unreadable.join("root-cert.pem")).unwrap();
    std::fs::write(unreadable.join("root-key.pem"), "x").unwrap();
    let out = issue(&unreadable);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unreadable/root-cert.pem") && stderr(&out).contains("cannot read"),
        "{}",
        stderr(&out)
    );

    let bad_id = ztunnel(&[
        "ca",
        "issue",
        "--dir",
        "x",
        "--identity",
        "spiffe://td/ns/a",
        "--out",
        "y",
    ]);
    assert_eq!(bad_id.status.code(), Some(2));
    assert!(
        stderr(&bad_id).contains("path \"/ns/a\""),
        "{}",
        stderr(&bad_id)
    );
}

#[test]
fn serve_and_rotate_refuse_bad_arguments_and_a_missing_cluster() {
    let out = ztunnel(&["ca", "serve", "--tunnel-service-account", "ztunnel"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out)
            .contains("--tunnel-service-account \"ztunnel\" is not of the form NAMESPACE/NAME"),
        "{}",
        stderr(&out)
    );

    let out = ztunnel(&["ca", "rotate", "sideways"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid value 'sideways'"),
        "{}",
        stderr(&out)
    );

    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .args(["ca", "rotate", "prepare"])
        .env("KUBECONFIG", dir.path().join("absent-kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot reach the Kubernetes API"),
        "{}",
        stderr(&out)
    );
}
