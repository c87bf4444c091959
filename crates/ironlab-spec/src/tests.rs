use super::*;

const FULL: &str = r#"
kind: playground
name: web-lab
title: Web tier lab
description: Two web servers behind a load balancer.
playground:
  networks:
    - {name: frontend, subnet: 172.16.0.0/24}
    - {name: backend, subnet: 10.0.1.0/24, private: true}
  machines:
    - name: lb
      runtime: auto
      resources: {cpu: 1, memory: 512MiB}
      drives:
        - {source: debian, mount: /, size: 4GiB}
        - {name: data, size: 1GiB, mount: /data, filesystem: ext4}
      network:
        interfaces: [{network: frontend}, {network: backend, address: 10.0.1.10}]
      users: [{name: laborant, default: true}]
      startupFiles: [{path: /etc/motd, content: "Welcome!\n", mode: "0644"}]
    - name: web-01
      drives: [{source: debian, mount: /, size: 4GiB}]
      network: {interfaces: [{network: backend}]}
  tabs:
    - {kind: terminal, machine: lb}
    - {kind: http-port, machine: lb, port: 80, name: Site}
  egress: allowlist
  tasks: {}
"#;

fn errors(yaml: &str) -> Vec<String> {
    match parse_manifest(yaml) {
        Ok(_) => vec![],
        Err(e) => e.errors.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn the_architecture_example_parses() {
    let m = parse_manifest(FULL).expect("the contract example is valid");
    assert_eq!(m.name, "web-lab");
    assert_eq!(m.playground.machines.len(), 2);
    assert_eq!(m.playground.machines[0].default_user(), "laborant");
    assert_eq!(m.playground.machines[1].default_user(), "root");
    assert_eq!(m.playground.machines[0].resources.memory, Size::mib(512));
    assert_eq!(m.playground.machines[1].resources.memory, Size::mib(512));
    assert_eq!(m.playground.egress, Egress::Allowlist);
    assert_eq!(m.playground.tabs[1].port, Some(80));
    assert_eq!(
        m.playground.machines[0].startup_files[0].content,
        "Welcome!\n"
    );
}

#[test]
fn round_trips_through_json() {
    let m = parse_manifest(FULL).expect("valid");
    let json = serde_json::to_value(&m).expect("serializes");
    assert_eq!(from_value(json).expect("still valid"), m);
}

#[test]
fn bad_size_names_the_field() {
    let yaml = FULL.replace(
        "{source: debian, mount: /, size: 4GiB}]",
        "{source: debian, mount: /, size: 12XB}]",
    );
    assert_eq!(
        errors(&yaml),
        vec![
            "playground.machines[1].drives[0].size: \"12XB\" is not a size (expected NNN followed by KiB, MiB or GiB)"
        ]
    );
}

#[test]
fn unknown_field_names_the_path() {
    let yaml = FULL.replace("runtime: auto", "runtime: auto\n      colour: red");
    let e = errors(&yaml);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("playground.machines[0].colour: unknown field `colour`"),
        "{e:?}"
    );
}

#[test]
fn semantic_errors_are_all_reported() {
    let yaml = r#"
kind: playground
name: X
title: t
playground:
  machines:
    - name: a
      drives: [{mount: /, size: 1GiB}]
      network: {interfaces: [{network: nowhere}]}
    - name: a
      resources: {cpu: 99, memory: 1MiB}
      drives: [{source: "oci://nope", mount: /, size: 1GiB}]
  tabs: [{kind: terminal, machine: ghost}]
  tasks:
    one: {run: "true", needs: [two]}
    two: {run: "true", needs: [one]}
    three: {run: "true", needs: [missing]}
"#;
    let e = errors(yaml);
    let want = [
        "name: \"X\" must be",
        "playground.machines[0].drives[0].source: the root drive needs a source image",
        "playground.machines[0].network.interfaces[0].network: no network named \"nowhere\"",
        "playground.machines[1].name: machine \"a\" is declared twice",
        "playground.machines[1].resources.cpu: 99 must be between 1 and 8",
        "playground.machines[1].resources.memory: 1MiB must be between 64MiB and 16GiB",
        "playground.machines[1].drives[0].source: \"oci://nope\" must name a registry",
        "playground.tabs[0].machine: no machine named \"ghost\"",
        "playground.tasks.three.needs: no task named \"missing\"",
        "dependency cycle",
    ];
    for w in want {
        assert!(e.iter().any(|x| x.contains(w)), "missing {w:?} in {e:#?}");
    }
}

#[test]
fn machine_count_is_limited() {
    let mut yaml =
        String::from("kind: playground\nname: many\ntitle: Many\nplayground:\n  machines:\n");
    for i in 0..6 {
        yaml.push_str(&format!(
            "    - {{name: m{i}, drives: [{{source: debian, mount: /, size: 1GiB}}]}}\n"
        ));
    }
    assert_eq!(
        errors(&yaml),
        vec!["playground.machines: must have 1–5 machines, found 6"]
    );
}

#[test]
fn garbage_is_rejected_without_panic() {
    for text in [
        "",
        "- a\n- b",
        "kind: [",
        "42",
        "kind: playground",
        "\u{0}\u{1}",
        "playground: {machines: 3}",
    ] {
        assert!(parse_manifest(text).is_err(), "{text:?}");
    }
}

#[test]
fn image_sources() {
    assert_eq!(
        ImageSource::parse("debian"),
        Ok(ImageSource::Stock("debian".into()))
    );
    assert_eq!(
        ImageSource::parse("oci://127.0.0.1:5000/test/busybox:1"),
        Ok(ImageSource::Oci("127.0.0.1:5000/test/busybox:1".into()))
    );
    assert!(ImageSource::parse("oci://reg/repo@sha256:abc").is_err());
    assert!(ImageSource::parse("Debian!").is_err());
    assert_eq!(
        ImageSource::parse("saved://abc123"),
        Ok(ImageSource::Saved("abc123".into()))
    );
    assert!(ImageSource::parse("saved://").is_err());
    assert!(ImageSource::parse("saved://ABC").is_err());
    assert!(ImageSource::parse("saved://abc/../x").is_err());
}
