//! Published ports end to end (issue 5): `ironlab port-forward` carries HTTP to a server in a
//! machine, the worker's port WebSocket refuses terminal tokens (and the terminal refuses port
//! tokens), an http-port tab's URL serves the machine's port to the run's owner only, and
//! `ssh -o ProxyCommand='ironlab ssh-proxy …'` logs into a machine running sshd.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{
    Needs, Platform, Registry, WsMsg, bin, http, preflight, run_with_timeout, serial, wait_for, ws,
};
use serde_json::{Value, json};

fn manifest(image: &str) -> String {
    format!(
        r#"kind: playground
name: webbox
title: A web server
description: One tiny machine serving HTTP.
playground:
  machines:
    - name: web
      runtime: container
      resources: {{cpu: 1, memory: 64MiB}}
      drives:
        - {{source: "{image}", mount: /, size: 256MiB}}
      users: [{{name: laborant, default: true}}]
  tabs:
    - {{kind: terminal, machine: web}}
    - {{kind: http-port, machine: web, port: 8000, name: Site}}
"#
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A running `ironlab port-forward`; killed in `Drop`.
struct Forwarder {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl Forwarder {
    fn start(p: &Platform, args: &[&str], stderr: PathBuf) -> Forwarder {
        let mut cmd = p.cli_command(&p.token());
        cmd.arg("port-forward")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("create the stderr file"));
        let mut child = cmd.spawn().expect("start ironlab port-forward");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Forwarder {
            child,
            lines,
            stderr,
        }
    }

    /// The next printed line (`Forwarding 127.0.0.1:P -> RUN/MACHINE port R`).
    fn line(&mut self) -> String {
        match self.lines.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => panic!(
                "port-forward printed nothing within 60 s; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        common::stop_child(&mut self.child, Duration::from_secs(5));
    }
}

/// The local address in a `Forwarding ADDR -> …` line.
fn forwarded_addr(line: &str) -> String {
    line.strip_prefix("Forwarding ")
        .and_then(|r| r.split_once(" -> "))
        .map(|(a, _)| a.to_string())
        .unwrap_or_else(|| panic!("unexpected port-forward line {line:?}"))
}

/// An HTTP/1.1 request to `addr` with an explicit `Host` (port hosts are `*.localhost`, which
/// the test resolves itself): (status, headers, body).
fn http_host(
    addr: &str,
    host: &str,
    path: &str,
    cookie: Option<&str>,
) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{cookie}\r\n"
    )
    .expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the answer");
    let raw = text(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad answer {raw:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect::<Vec<_>>();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_string()
    };
    (status, headers, body)
}

/// Answers one request with `101 Switching Protocols`, then echoes.
const UPGRADE_SERVER: &str = r#"#!/bin/sh
cr=$(printf '\r')
while IFS= read -r line; do
  [ "$line" = "$cr" ] && break
  [ -z "$line" ] && break
done
printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n'
exec cat
"#;

/// Sends an `Upgrade: echo` request through the port host, then a line over the upgraded
/// connection; returns what came back (`None` when the upgrade did not happen).
fn upgrade_echo(addr: &str, host: &str, cookie: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET /echo HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    )
    .ok()?;
    let mut r = BufReader::new(s.try_clone().ok()?);
    let mut status = String::new();
    r.read_line(&mut status).ok()?;
    if !status.starts_with("HTTP/1.1 101") {
        return None;
    }
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        if h.trim().is_empty() {
            break;
        }
    }
    s.write_all(b"ping through the upgrade\n").ok()?;
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    Some(line)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn port_forward_and_http_port_tabs_reach_a_server_in_the_machine() {
    let _serial = serial();
    let Some(env) = preflight(
        "port_forward_and_http_port_tabs_reach_a_server_in_the_machine",
        Needs {
            test_image: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    let registry = Registry::start();
    let image = registry.push(
        env.test_image.as_ref().expect("preflight checked it"),
        "test/busybox",
        "1",
    );
    let mut p = Platform::start(&env);
    let out = p.create_playground(&manifest(&image));
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    let run = p.start_run("webbox");
    let id = run["id"].as_str().expect("id").to_string();

    // A web server inside the machine, on its loopback only.
    p.ssh_ok(
        &id,
        &[
            "sh",
            "-c",
            "mkdir -p /tmp/www && echo hello-from-web > /tmp/www/index.html && \
             busybox httpd -p 127.0.0.1:8000 -h /tmp/www",
        ],
    );

    // port-forward: a free local port to 8000, and another to a port nobody listens on.
    let dir = p.data.join("..");
    let mut fwd = Forwarder::start(
        &p,
        &[&id, "--machine", "web", "0:8000", "0:8001"],
        dir.join("port-forward.stderr"),
    );
    let web = fwd.line();
    assert!(
        web.ends_with(&format!(" -> {id}/web port 8000")),
        "port-forward printed {web:?}"
    );
    let web = forwarded_addr(&web);
    let dead = forwarded_addr(&fwd.line());
    assert!(web.starts_with("127.0.0.1:"), "{web}");
    let got = wait_for(Duration::from_secs(10), Duration::from_millis(200), || {
        common::try_http("GET", &format!("http://{web}/"), None, None)
            .ok()
            .filter(|r| r.status == 200)
    });
    let got = got.unwrap_or_else(|| {
        panic!(
            "no HTTP answer through port-forward; its stderr:\n{}\n{}",
            fwd.stderr(),
            p.logs()
        )
    });
    assert_eq!(got.body, "hello-from-web\n");
    // Each connection gets its own token and WebSocket.
    for _ in 0..3 {
        let r = http("GET", &format!("http://{web}/index.html"), None, None);
        assert_eq!((r.status, r.body.as_str()), (200, "hello-from-web\n"));
    }
    // Nothing on 8001: the local connection is closed and port-forward says why.
    assert!(
        common::try_http("GET", &format!("http://{dead}/"), None, None).is_err(),
        "a refused remote port must not produce an answer"
    );
    let why = wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
        let e = fwd.stderr();
        // Wait for the whole line, not just its start.
        e.lines()
            .any(|l| l.contains("8001") && l.to_lowercase().contains("refused"))
            .then_some(e)
    })
    .unwrap_or_else(|| fwd.stderr());
    assert!(
        why.contains("machine web: cannot connect to 127.0.0.1:8001")
            && why.to_lowercase().contains("refused"),
        "port-forward stderr: {why}"
    );
    // Ctrl-C stops it cleanly.
    common::signal(fwd.child.id(), "INT");
    let st = wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
        fwd.child.try_wait().ok().flatten()
    });
    assert_eq!(
        st.map(|s| s.code()),
        Some(Some(0)),
        "port-forward after Ctrl-C"
    );

    // The raw protocol: bytes, a half-close, the answer and the server's eof.
    let token = p.token();
    let connect = |body: Value| -> Value {
        let r = http(
            "POST",
            &p.api(&format!("/runs/{id}/connect")),
            Some(&token),
            Some(&body.to_string()),
        );
        assert_eq!(r.status, 200, "connect {body}: {}", r.body);
        r.json()
    };
    let c = connect(json!({"machine": "web", "port": 8000}));
    let url = c["url"].as_str().expect("url");
    assert!(url.contains("/machines/web/port/8000?token="), "{url}");
    let mut sock = ws(url).unwrap_or_else(|r| panic!("port WebSocket refused: {r:?}"));
    sock.send_binary(b"GET / HTTP/1.0\r\n\r\n");
    sock.send_text("eof");
    let (mut answer, mut eof) = (Vec::new(), false);
    loop {
        match sock.recv().expect("frame") {
            WsMsg::Binary(b) => answer.extend(b),
            WsMsg::Text(t) if t == "eof" => eof = true,
            WsMsg::Text(t) => panic!("unexpected text frame {t:?}"),
            WsMsg::Close => break,
        }
    }
    let answer = text(&answer);
    assert!(
        answer.starts_with("HTTP/1.") && answer.ends_with("hello-from-web\n"),
        "{answer}"
    );
    assert!(
        eof,
        "the server's close is reported before the WebSocket close"
    );

    // A terminal token cannot open the port, a port token cannot open the terminal, and a
    // port nobody listens on is a 502 with the reason.
    let c = connect(json!({"machine": "web"}));
    let as_port = c["url"]
        .as_str()
        .expect("url")
        .replace("/terminal?", "/port/8000?");
    let r = ws(&as_port)
        .err()
        .expect("a terminal token on a port is refused");
    assert_eq!(r.status, 403, "{}", r.body);
    let c = connect(json!({"machine": "web", "port": 8000}));
    let as_term = c["url"]
        .as_str()
        .expect("url")
        .replace("/port/8000?", "/terminal?");
    let r = ws(&as_term)
        .err()
        .expect("a port token on the terminal is refused");
    assert_eq!(r.status, 403, "{}", r.body);
    let c = connect(json!({"machine": "web", "port": 8001}));
    let r = ws(c["url"].as_str().expect("url"))
        .err()
        .expect("nothing listens on 8001");
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(
        r.body.contains("cannot connect to 127.0.0.1:8001"),
        "{}",
        r.body
    );

    // The http-port tab: the run page links to it; the link signs the owner in on the port's
    // own host, which then serves the machine's port at its root.
    let server = p.server();
    let addr = server.trim_start_matches("http://").to_string();
    // (`ironlab http-port` prints the link the tab opens.)
    let link = p
        .cli_ok(&["http-port", &id, "--machine", "web", "8000"])
        .trim()
        .to_string();
    let port_host = format!(
        "{id}-8000-web.localhost:{}",
        addr.rsplit(':').next().unwrap_or("")
    );
    let login = link
        .strip_prefix(&format!("http://{port_host}"))
        .unwrap_or_else(|| panic!("link {link} is not on {port_host}"));
    let (s, _, body) = http_host(&addr, &port_host, "/", None);
    assert_eq!(s, 401, "no session yet: {body}");
    let (s, headers, _) = http_host(&addr, &port_host, login, None);
    assert_eq!(s, 303);
    let cookie = header(&headers, "set-cookie")
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_string();
    let (s, _, body) = http_host(&addr, &port_host, "/", Some(&cookie));
    assert_eq!((s, body.as_str()), (200, "hello-from-web\n"));
    let (s, _, body) = http_host(&addr, &port_host, "/nope.html", Some(&cookie));
    assert_eq!(s, 404, "the machine's own 404 comes through: {body}");

    // Upgrades (WebSocket and others) pass through: a tiny server answering 101 and echoing.
    p.ssh_ok(
        &id,
        &[
            "sh",
            "-c",
            "printf '%s' \"$1\" > /tmp/up.sh && chmod +x /tmp/up.sh && \
             setsid busybox nc -ll -p 8002 -e /tmp/up.sh </dev/null >/dev/null 2>&1 &",
            "sh",
            UPGRADE_SERVER,
        ],
    );
    let r = http(
        "POST",
        &p.api(&format!("/runs/{id}/http-ports")),
        Some(&token),
        Some(r#"{"machine":"web","port":8002}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let link = r.json()["url"].as_str().expect("url").to_string();
    let echo_host = port_host.replacen("-8000-", "-8002-", 1);
    let login = link
        .strip_prefix(&format!("http://{echo_host}"))
        .unwrap_or_else(|| panic!("link {link} is not on {echo_host}"));
    let (s, headers, _) = http_host(&addr, &echo_host, login, None);
    assert_eq!(s, 303);
    let echo_cookie = header(&headers, "set-cookie")
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_string();
    let upgraded = wait_for(Duration::from_secs(10), Duration::from_millis(200), || {
        upgrade_echo(&addr, &echo_host, &echo_cookie)
    });
    assert_eq!(
        upgraded.as_deref(),
        Some("ping through the upgrade\n"),
        "no echo through an upgraded connection\n{}",
        p.logs()
    );

    // Another user: no link for this run, and no way in without one.
    let r = http(
        "POST",
        &p.api("/users"),
        Some(&token),
        Some(r#"{"name":"mallory"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let mallory = r.json()["token"].as_str().expect("token").to_string();
    let r = http(
        "POST",
        &p.api(&format!("/runs/{id}/http-ports")),
        Some(&mallory),
        Some(r#"{"machine":"web","port":8000}"#),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    let r = http(
        "POST",
        &p.api(&format!("/runs/{id}/connect")),
        Some(&mallory),
        Some(r#"{"machine":"web","port":8000}"#),
    );
    assert_eq!(r.status, 404, "{}", r.body);

    p.destroy(&id);
    let (s, _, body) = http_host(&addr, &port_host, "/", Some(&cookie));
    assert_eq!(s, 503, "the run is gone: {body}");
    p.assert_clean(&id);
}

#[test]
fn ssh_through_ssh_proxy_logs_into_sshd_in_the_machine() {
    let _serial = serial();
    let Some(env) = preflight(
        "ssh_through_ssh_proxy_logs_into_sshd_in_the_machine",
        Needs {
            debian: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    for tool in ["ssh", "ssh-keygen"] {
        if common::which(tool).is_none() {
            assert!(!common::required(), "`{tool}` is not installed");
            eprintln!("SKIPPED: `{tool}` is not installed (apt-get install openssh-client)");
            return;
        }
    }
    let mut p = Platform::start(&env);
    let run = p.start_run("debian");
    let id = run["id"].as_str().expect("id").to_string();
    let has_sshd = p.ssh(&id, &["test", "-x", "/usr/sbin/sshd"]);
    assert!(
        has_sshd.status.success(),
        "the stock debian image has no /usr/sbin/sshd: rebuild it with images/debian/build.sh"
    );

    // A key pair on the host; the public key in laborant's authorized_keys; sshd started.
    let keys = p.data.join("../ssh");
    std::fs::create_dir_all(&keys).expect("key dir");
    let key = keys.join("id_ed25519");
    let mut keygen = Command::new("ssh-keygen");
    keygen.args(["-q", "-t", "ed25519", "-N", "", "-C", "ironlab-test", "-f"]);
    keygen.arg(&key);
    let out = run_with_timeout(keygen, Duration::from_secs(30));
    assert!(out.status.success(), "ssh-keygen: {}", text(&out.stderr));
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    p.ssh_ok(
        &id,
        &[
            "sh",
            "-c",
            "umask 077 && mkdir -p ~/.ssh && printf '%s\\n' \"$1\" > ~/.ssh/authorized_keys",
            "sh",
            public.trim(),
        ],
    );
    p.ssh_ok(
        &id,
        &[
            "sudo",
            "sh",
            "-c",
            "ssh-keygen -A >/dev/null && mkdir -p /run/sshd && /usr/sbin/sshd",
        ],
    );

    let proxy = format!("{} ssh-proxy {id} --machine debian", bin().display());
    let mut ssh = Command::new("ssh");
    ssh.env("IRONLAB_SERVER", p.server())
        .env("IRONLAB_TOKEN", p.token())
        .env("XDG_CONFIG_HOME", p.data.join("../cli-config"))
        .args(["-F", "/dev/null", "-i"])
        .arg(&key)
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=60",
            "-o",
        ])
        .arg(format!("ProxyCommand={proxy}"))
        .args(["laborant@debian", "echo $((6*7)); id -un; hostname"]);
    let out = run_with_timeout(ssh, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "ssh through ssh-proxy failed ({}):\nstdout: {}\nstderr: {}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        p.logs()
    );
    assert_eq!(text(&out.stdout), "42\nlaborant\ndebian\n");

    // Without sshd on the port, ssh-proxy says so and fails.
    let out = p.cli(&["ssh-proxy", &id, "--machine", "debian", "--port", "2222"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot connect to 127.0.0.1:2222"),
        "ssh-proxy stderr: {err}"
    );

    p.destroy(&id);
    p.assert_clean(&id);
}
