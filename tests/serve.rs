//! `logquant serve` end to end, driven by the real OpenAI Python client
//! (tests/serve/client_test.py, in the venv that scripts/py-venv.sh makes from
//! tests/serve/requirements.txt): chat, completion, streaming, models, 16 clients
//! against 4 sequences (each answer equal to the request served alone), cancellation,
//! bad requests and the API key, a full queue (503), SIGTERM, and 16 clients against a
//! server with keys by channel. Loopback only, on the tiny synthetic model, with the
//! two-tier cache.
#![cfg(feature = "serve")]

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn openai_client_against_the_server() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = Command::new("bash").arg(root.join("scripts/py-venv.sh")).output().expect("bash runs");
    assert!(
        venv.status.success(),
        "scripts/py-venv.sh could not install the test client from PyPI:\n{}",
        String::from_utf8_lossy(&venv.stderr)
    );
    let python = String::from_utf8(venv.stdout).unwrap().trim().to_string();
    let model = common::tiny_model();
    let out = Command::new(&python)
        .arg(root.join("tests/serve/client_test.py"))
        .args(["--bin", env!("CARGO_BIN_EXE_logquant"), "--model"])
        .arg(&model)
        .output()
        .expect("run the client test");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the OpenAI client checks failed:\n{log}");
    assert!(log.contains("checks passed"), "{log}");
    eprintln!("{log}");
}
