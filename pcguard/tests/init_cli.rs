//! `pcguard init --papercut-dir` on fixture installations, then `pcguard
//! check` on what it wrote: no privileges needed.

use std::{path::Path, process::Command};

fn pcguard(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pcguard")).args(args).output().expect("pcguard runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name).display().to_string()
}

#[test]
fn init_writes_a_config_that_check_accepts() {
    let dir = std::env::temp_dir().join(format!("pcguard-init-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, expect) in [
        ("papercut-primary", vec!["web-http", "tcp", "80", "db-postgresql", "9191 -> 80 (papercut.http_port)"]),
        ("papercut-secondary", vec!["upstream-http", "primary_server[192.0.2.1/32]"]),
    ] {
        let out = dir.join(format!("{name}.toml"));
        let out_s = out.display().to_string();
        let (ok, _, err) = pcguard(&["init", "--papercut-dir", &fixture(name), "--interface", "eth0", "-o", &out_s]);
        assert!(ok, "{name}: {err}");
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.contains("mode = \"monitor\""), "{text}");
        let (ok, table, err) = pcguard(&["check", &out_s]);
        assert!(ok, "{name}: check: {err}\n{text}");
        for e in expect {
            assert!(table.contains(e), "{name}: {e:?} in\n{table}");
        }
        // An existing file is never replaced.
        let (ok, _, err) = pcguard(&["init", "--papercut-dir", &fixture(name), "--interface", "eth0", "-o", &out_s]);
        assert!(!ok && err.contains("never replaced"), "{err}");
    }
    let (ok, _, err) = pcguard(&["init", "--papercut-dir", &dir.display().to_string(), "--interface", "eth0"]);
    assert!(!ok && err.contains("neither server/server.properties"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
