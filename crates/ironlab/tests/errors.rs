//! Wrong input gets a clear message and a 4xx, both from the REST API and through the CLI.

mod common;

use common::{Needs, Platform, Registry, http, preflight, serial, ws};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const BAD_SIZE: &str = r#"kind: playground
name: bad-size
title: Bad size
playground:
  machines:
    - name: box
      drives: [{source: debian, mount: /, size: 12XB}]
"#;

#[test]
fn bad_requests_get_clear_4xx_errors() {
    let _serial = serial();
    let Some(env) = preflight("bad_requests_get_clear_4xx_errors", Needs::default()) else {
        return;
    };
    let p = Platform::start(&env);
    let token = p.token();

    // Bad manifest: the API answers 400/422 naming the field; the CLI fails with the same.
    let body = serde_json::json!({
        "kind": "playground", "name": "bad-size", "title": "Bad size",
        "playground": {"machines": [{"name": "box", "drives": [{"source": "debian", "mount": "/", "size": "12XB"}]}]}
    });
    let r = http(
        "POST",
        &p.api("/playgrounds"),
        Some(&token),
        Some(&body.to_string()),
    );
    assert!(
        matches!(r.status, 400 | 422),
        "bad manifest: status {} {}",
        r.status,
        r.body
    );
    assert!(
        r.body.contains("playground.machines[0].drives[0].size"),
        "the API error does not name the field: {}",
        r.body
    );
    let err = r.json();
    assert!(
        err["error"].is_string(),
        "error body has no `error`: {}",
        r.body
    );
    let out = p.create_playground(BAD_SIZE);
    assert!(!out.status.success(), "CLI accepted a bad manifest");
    assert!(
        text(&out.stderr).contains("playground.machines[0].drives[0].size"),
        "CLI error does not name the field: {}",
        text(&out.stderr)
    );

    // Unknown playground.
    let r = http(
        "POST",
        &p.api("/runs"),
        Some(&token),
        Some(r#"{"playground":"no-such-playground"}"#),
    );
    assert_eq!(r.status, 404, "start of an unknown playground: {}", r.body);
    assert!(
        r.body.contains("no-such-playground"),
        "error does not name the playground: {}",
        r.body
    );
    let r = http(
        "GET",
        &p.api("/playgrounds/no-such-playground"),
        Some(&token),
        None,
    );
    assert_eq!(r.status, 404, "GET unknown playground: {}", r.body);
    let out = p.cli(&["playground", "start", "no-such-playground"]);
    assert!(!out.status.success(), "CLI started an unknown playground");
    assert!(
        text(&out.stderr).contains("no-such-playground"),
        "CLI error does not name the playground: {}",
        text(&out.stderr)
    );

    // Unknown run.
    for (method, path) in [
        ("GET", "/runs/nosuchrun000"),
        ("DELETE", "/runs/nosuchrun000"),
    ] {
        let r = http(method, &p.api(path), Some(&token), None);
        assert_eq!(r.status, 404, "{method} {path}: {}", r.body);
    }
    let r = http(
        "POST",
        &p.api("/runs/nosuchrun000/connect"),
        Some(&token),
        Some("{}"),
    );
    assert_eq!(r.status, 404, "connect to an unknown run: {}", r.body);
    for args in [
        &["playground", "destroy", "nosuchrun000"][..],
        &["ssh", "nosuchrun000", "--", "true"][..],
    ] {
        let out = p.cli(args);
        assert!(
            !out.status.success(),
            "`ironlab {}` succeeded",
            args.join(" ")
        );
        assert!(
            text(&out.stderr).contains("nosuchrun000"),
            "`ironlab {}` error does not name the run: {}",
            args.join(" "),
            text(&out.stderr)
        );
    }

    // Wrong API token: 401 from the API, a failing CLI.
    let r = http(
        "GET",
        &p.api("/me"),
        Some("ilt_wrongwrongwrongwrongwrongwrong"),
        None,
    );
    assert_eq!(r.status, 401, "wrong token: {}", r.body);
    let r = http("GET", &p.api("/playgrounds"), None, None);
    assert_eq!(r.status, 401, "no token: {}", r.body);
    let out = p.cli_with_token(
        "ilt_wrongwrongwrongwrongwrongwrong",
        &["playground", "list"],
    );
    assert!(!out.status.success(), "CLI succeeded with a wrong token");
    assert!(
        !text(&out.stderr).trim().is_empty(),
        "CLI failed silently with a wrong token"
    );

    // Output into a closed pipe (`ironlab playground catalog -o json | true`): the CLI ends by
    // SIGPIPE as other tools do, not with a panic about printing.
    let mut cmd = p.cli_command(&token);
    cmd.args(["playground", "catalog", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn the CLI");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait for the CLI");
    assert!(
        !text(&out.stderr).contains("panicked"),
        "the CLI panicked on a closed stdout: {}",
        text(&out.stderr)
    );
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(
        out.status.signal(),
        Some(13),
        "SIGPIPE expected: {}",
        out.status
    );
}

fn two_machines(image: &str) -> String {
    format!(
        r#"kind: playground
name: two-boxes
title: Two boxes
playground:
  machines:
    - name: alpha
      runtime: container
      resources: {{memory: 64MiB}}
      drives: [{{source: "{image}", mount: /, size: 128MiB}}]
      users: [{{name: laborant, default: true}}]
    - name: beta
      runtime: container
      resources: {{memory: 64MiB}}
      drives: [{{source: "{image}", mount: /, size: 128MiB}}]
      users: [{{name: laborant, default: true}}]
"#
    )
}

#[test]
fn terminal_tokens_are_single_use_and_bound_to_a_machine() {
    let _serial = serial();
    let Some(env) = preflight(
        "terminal_tokens_are_single_use_and_bound_to_a_machine",
        Needs {
            test_image: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    let layout = env
        .test_image
        .clone()
        .expect("preflight checked the test image");
    let registry = Registry::start();
    let image = registry.push(&layout, "test/busybox", "1");
    let mut p = Platform::start(&env);
    let token = p.token();
    let out = p.create_playground(&two_machines(&image));
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    let run = p.start_run("two-boxes");
    let id = run["id"].as_str().expect("start prints an id").to_string();
    assert_eq!(
        p.cli_ok(&["ssh", &id, "--machine", "beta", "--", "hostname"]),
        "beta\n"
    );

    let connect = |machine: &str| {
        let body = serde_json::json!({ "machine": machine }).to_string();
        let r = http(
            "POST",
            &p.api(&format!("/runs/{id}/connect")),
            Some(&token),
            Some(&body),
        );
        assert_eq!(r.status, 200, "connect to {machine}: {}", r.body);
        let v = r.json();
        assert_eq!(v["machine"], machine, "connect answered {v}");
        v["url"]
            .as_str()
            .expect("connect returns a url")
            .to_string()
    };

    // A token works once.
    let url = connect("alpha");
    let mut session = ws(&url)
        .unwrap_or_else(|r| panic!("first use of a token refused: {} {}", r.status, r.body));
    let (stdout, _, code) = session.exec(&["hostname"]);
    assert_eq!(
        (String::from_utf8_lossy(&stdout).as_ref(), code),
        ("alpha\n", 0)
    );
    drop(session);
    match ws(&url) {
        Ok(_) => panic!("a used terminal token was accepted a second time"),
        Err(r) => assert!(
            (400..500).contains(&r.status),
            "reused token: status {} {}",
            r.status,
            r.body
        ),
    }

    // A token for alpha does not open beta.
    let url = connect("alpha");
    let stolen = url.replacen("/machines/alpha/", "/machines/beta/", 1);
    assert_ne!(stolen, url, "unexpected terminal URL shape: {url}");
    match ws(&stolen) {
        Ok(_) => panic!("a token issued for machine alpha opened machine beta"),
        Err(r) => assert!(
            (400..500).contains(&r.status),
            "token for another machine: status {} {}",
            r.status,
            r.body
        ),
    }

    // A made-up token is refused too.
    let forged = format!(
        "{}?token=forgedforgedforgedforgedforged00",
        url.split('?').next().unwrap_or(&url)
    );
    match ws(&forged) {
        Ok(_) => panic!("a forged terminal token was accepted"),
        Err(r) => assert!(
            (400..500).contains(&r.status),
            "forged token: status {} {}",
            r.status,
            r.body
        ),
    }

    p.destroy(&id);
    p.assert_clean(&id);
}
