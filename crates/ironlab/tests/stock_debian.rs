//! The stock `debian` playground: Debian 12, default user `laborant` with passwordless sudo.

mod common;

use common::{Needs, Platform, preflight, serial};

#[test]
fn stock_debian_playground() {
    let _serial = serial();
    let Some(env) = preflight(
        "stock_debian_playground",
        Needs {
            debian: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    let mut p = Platform::start(&env);

    let catalog = p.cli_ok(&["playground", "catalog"]);
    assert!(
        catalog.contains("debian"),
        "the catalog lists no stock debian playground:\n{catalog}"
    );

    let run = p.start_run("debian");
    assert_eq!(run["state"], "running", "start printed {run}");
    let id = run["id"].as_str().expect("start prints an id").to_string();

    let os = p.ssh_ok(&id, &["cat", "/etc/os-release"]);
    assert!(
        os.contains("Debian GNU/Linux 12"),
        "/etc/os-release is not Debian 12:\n{os}"
    );
    assert_eq!(p.ssh_ok(&id, &["id", "-un"]), "laborant\n");
    let sudo = p.ssh(&id, &["sudo", "-n", "true"]);
    assert!(
        sudo.status.success(),
        "passwordless sudo failed ({}): {}",
        sudo.status,
        String::from_utf8_lossy(&sudo.stderr)
    );
    assert_eq!(p.ssh_ok(&id, &["sudo", "-n", "id", "-u"]), "0\n");

    p.destroy(&id);
    p.assert_clean(&id);
}
