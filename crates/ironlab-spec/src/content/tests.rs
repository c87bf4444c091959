use super::*;

fn bundle(files: &[(&str, &str)]) -> Bundle {
    let mut b = Bundle::default();
    for (p, t) in files {
        b.insert(p, t.as_bytes().to_vec()).expect("insert");
    }
    b
}

fn errors(name: &str, files: &[(&str, &str)]) -> String {
    match parse_bundle(name, &bundle(files)) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

const CHALLENGE: &str = "---\nkind: challenge\ntitle: Hello\nplayground:\n  name: debian\n\
tasks:\n  a:\n    run: 'true'\n  b:\n    needs: [a]\n    run: 'true'\n---\n\n# Hi\n\n::task{name=a}\n";

#[test]
fn a_good_challenge_parses() {
    let item = parse_bundle(
        "hello-world",
        &bundle(&[
            ("index.md", CHALLENGE),
            ("solution.md", "```sh\ntrue\n```\n"),
            ("__static__/a.png", "png"),
        ]),
    )
    .expect("valid");
    assert_eq!(item.front.kind, ContentKind::Challenge);
    assert_eq!(item.front.title, "Hello");
    assert_eq!(item.front.visibility, Visibility::Private);
    assert_eq!(item.statics, vec!["a.png".to_string()]);
    assert!(item.body.contains("# Hi"));
    assert_eq!(item.front.tasks.len(), 2);
}

#[test]
fn every_scaffold_is_valid() {
    for kind in [
        ContentKind::Tutorial,
        ContentKind::Challenge,
        ContentKind::Course,
        ContentKind::SkillPath,
    ] {
        let b = scaffold(kind, "my-item");
        let item = parse_bundle("my-item", &b).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        assert_eq!(item.front.kind, kind);
    }
}

#[test]
fn bad_front_matter_names_file_and_field() {
    let e = errors("x-item", &[("index.md", "# no front matter\n")]);
    assert!(
        e.contains("index.md: must start with YAML front matter"),
        "{e}"
    );
    let e = errors(
        "x-item",
        &[("index.md", "---\nkind: challenge\ntitle: [oops\n---\n")],
    );
    assert!(e.contains("index.md: front matter: not valid YAML"), "{e}");
    let e = errors(
        "x-item",
        &[(
            "index.md",
            "---\nkind: tutorial\ntitle: T\ndifficulty: extreme\n---\n",
        )],
    );
    assert!(e.starts_with("index.md: difficulty: "), "{e}");
    let e = errors(
        "x-item",
        &[(
            "index.md",
            "---\nkind: tutorial\ntitle: T\ncolour: red\n---\n",
        )],
    );
    assert!(e.contains("unknown field `colour`"), "{e}");
    let e = errors(
        "x-item",
        &[(
            "index.md",
            "---\nkind: tutorial\ntitle: ''\ntags: [Bad Tag]\n---\n",
        )],
    );
    assert!(
        e.contains("index.md: title: must have 1-120 characters"),
        "{e}"
    );
    assert!(e.contains("index.md: tags[0]: \"Bad Tag\""), "{e}");
}

#[test]
fn unknown_kind_is_named() {
    let e = errors(
        "x-item",
        &[("index.md", "---\nkind: quiz\ntitle: T\n---\n")],
    );
    assert_eq!(
        e,
        "index.md: kind: \"quiz\" is not a kind of content (tutorial, challenge, course, skill-path)"
    );
    let e = errors("x-item", &[("index.md", "---\ntitle: T\n---\n")]);
    assert!(e.starts_with("index.md: kind: missing"), "{e}");
}

#[test]
fn task_cycle_is_reported_with_its_path() {
    let text = "---\nkind: challenge\ntitle: T\nplayground: {name: debian}\ntasks:\n  a:\n    needs: [b]\n    run: 'true'\n  b:\n    needs: [a]\n    run: 'true'\n---\n";
    let e = errors("x-item", &[("index.md", text)]);
    assert!(
        e.contains("index.md: tasks.") && e.contains("dependency cycle"),
        "{e}"
    );
    let text = "---\nkind: challenge\ntitle: T\nplayground: {name: debian}\ntasks:\n  a:\n    needs: [zz]\n    run: 'true'\n---\n";
    let e = errors("x-item", &[("index.md", text)]);
    assert!(
        e.contains("index.md: tasks.a.needs: no task named \"zz\""),
        "{e}"
    );
}

#[test]
fn missing_image_is_reported() {
    let text = "---\nkind: tutorial\ntitle: T\ncover: nope.png\n---\n\n![diagram](__static__/diagram.png)\n![ok](./__static__/ok.png)\n![remote](https://example.org/x.png)\n![loose](pic.png)\n[file](__static__/missing.txt)\n";
    let e = errors("x-item", &[("index.md", text), ("__static__/ok.png", "x")]);
    assert!(
        e.contains(
            "index.md: image \"__static__/diagram.png\": there is no file __static__/diagram.png"
        ),
        "{e}"
    );
    assert!(!e.contains("ok.png"), "{e}");
    assert!(!e.contains("example.org"), "{e}");
    assert!(
        e.contains("image \"pic.png\": images live in __static__/"),
        "{e}"
    );
    assert!(e.contains("link \"__static__/missing.txt\""), "{e}");
    assert!(
        e.contains("index.md: cover: \"nope.png\" is not a file in __static__/"),
        "{e}"
    );
}

#[test]
fn task_directives_must_name_tasks() {
    let text = "---\nkind: challenge\ntitle: T\nplayground: {name: debian}\ntasks:\n  a:\n    run: 'true'\n---\n\n::task{name=a}\n::task{name=b}\n```\n::task{name=inside_code}\n```\n::task[a]\n";
    let e = errors("x-item", &[("index.md", text)]);
    assert!(
        e.contains("index.md: line 3: ::task{name=b} names no task"),
        "{e}"
    );
    assert!(!e.contains("inside_code"), "{e}");
    assert!(e.contains("line 7: ::task[a] must be written"), "{e}");
}

#[test]
fn kind_rules() {
    let e = errors(
        "x-item",
        &[("index.md", "---\nkind: challenge\ntitle: T\n---\n")],
    );
    assert!(
        e.contains("index.md: playground: a challenge needs a playground"),
        "{e}"
    );
    assert!(
        e.contains("index.md: tasks: a challenge needs at least one task"),
        "{e}"
    );
    let e = errors(
        "x-item",
        &[(
            "index.md",
            "---\nkind: skill-path\ntitle: T\nunits:\n  - title: U\n    items: [x-item, Bad]\n---\n",
        )],
    );
    assert!(
        e.contains("units[0].items[0]: \"x-item\" is not the name of another item"),
        "{e}"
    );
    assert!(e.contains("units[0].items[1]"), "{e}");
    let e = errors(
        "x-item",
        &[("index.md", "---\nkind: course\ntitle: T\n---\n")],
    );
    assert!(e.contains("a course needs at least one module"), "{e}");
    let e = errors(
        "x-item",
        &[
            ("index.md", "---\nkind: course\ntitle: T\n---\n"),
            (
                "01-a/01-l.md",
                "---\ntitle: L\ntasks:\n  t:\n    run: 'true'\n---\n",
            ),
            ("01-a/02-m.md", "no front matter"),
        ],
    );
    assert!(
        e.contains("01-a/01-l.md: tasks: tasks run in a playground"),
        "{e}"
    );
    assert!(
        e.contains("01-a/02-m.md: must start with YAML front matter"),
        "{e}"
    );
    let e = errors("x-item", &[("index.md", CHALLENGE), ("notes.txt", "x")]);
    assert!(e.contains("notes.txt: not part of an item"), "{e}");
    let e = errors("X", &[("index.md", CHALLENGE)]);
    assert!(e.contains(".: name: \"X\" is not an item name"), "{e}");
}

#[test]
fn course_modules_and_lessons_in_order() {
    let item = parse_bundle(
        "my-course",
        &bundle(&[
            ("index.md", "---\nkind: course\ntitle: C\n---\n"),
            ("02-more/01-x.md", "---\ntitle: X\n---\nx\n"),
            ("01-start/index.md", "---\ntitle: Start\n---\nintro\n"),
            ("01-start/02-b.md", "---\ntitle: B\n---\nb\n"),
            ("01-start/01-a.md", "---\ntitle: A\nplayground: {name: debian}\ntasks:\n  t:\n    run: 'true'\n---\n::task{name=t}\n"),
        ]),
    )
    .expect("valid");
    let shape: Vec<(String, Vec<String>)> = item
        .modules
        .iter()
        .map(|m| {
            (
                m.front.title.clone(),
                m.lessons.iter().map(|l| l.slug.clone()).collect(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            (
                "Start".to_string(),
                vec!["01-a".to_string(), "02-b".to_string()]
            ),
            ("02-more".to_string(), vec!["01-x".to_string()]),
        ]
    );
    assert_eq!(item.playgrounds().len(), 1);
}

#[test]
fn tar_round_trip_and_unsafe_paths() {
    let b = bundle(&[("index.md", CHALLENGE), ("__static__/a/b.png", "png")]);
    let tar = b.to_tar();
    assert_eq!(Bundle::from_tar(&tar).expect("tar"), b);
    assert_eq!(b.to_tar(), tar, "same files, same bytes");
    let mut bad = Bundle::default();
    let e = bad.insert("../etc/passwd", vec![]).expect_err("refused");
    assert!(e.to_string().contains("must be relative"), "{e}");
    assert!(
        Bundle::from_tar(b"not a tar archive at all, but long enough to look like a header? no")
            .is_err()
    );
}

#[test]
fn effective_manifest_applies_overrides_within_limits() {
    let pg = crate::parse_manifest(
        "kind: playground\nname: debian\ntitle: D\nplayground:\n  machines:\n    - name: debian\n      resources: {cpu: 2, memory: 1GiB}\n      drives: [{source: debian, mount: /, size: 4GiB}]\n  tasks:\n    old:\n      run: 'true'\n",
    )
    .expect("manifest");
    let item = parse_bundle("hello-world", &bundle(&[("index.md", CHALLENGE)])).expect("valid");
    let p = item.front.playground.clone().expect("playground");
    let m = effective_manifest("index.md", &pg, &p, &item.front.tasks).expect("effective");
    assert_eq!(
        m.playground.tasks.keys().collect::<Vec<_>>(),
        vec!["a", "b"],
        "the item's tasks replace the playground's"
    );
    let too_big: PlaygroundRef = serde_json::from_value(serde_json::json!({
        "name": "debian",
        "machines": [{"name": "debian", "resources": {"cpu": 4, "memory": "512MiB"}}, {"name": "ghost"}]
    }))
    .expect("ref");
    let e = effective_manifest("index.md", &pg, &too_big, &item.front.tasks)
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains(
            "index.md: playground.machines[0].resources.cpu: 4 is more than the playground's 2"
        ),
        "{e}"
    );
    assert!(
        e.contains("playground.machines[1].name: playground debian has no machine \"ghost\""),
        "{e}"
    );
    let mut wrong_machine = item.front.tasks.clone();
    if let Some(t) = wrong_machine.get_mut("a") {
        t.machine = Some("nope".into());
    }
    let e = effective_manifest("index.md", &pg, &p, &wrong_machine)
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("index.md: tasks.a.machine: no machine named \"nope\""),
        "{e}"
    );
    // The solution is checked against the effective manifest.
    let with_bad_solution = parse_bundle(
        "hello-world",
        &bundle(&[
            ("index.md", CHALLENGE),
            ("solution.md", "```sh machine=ghost\ntrue\n```\n"),
        ]),
    )
    .expect("valid alone");
    let e = with_bad_solution
        .check_solution(&m)
        .expect_err("bad")
        .to_string();
    assert!(
        e.contains("solution.md: line 1: no machine named \"ghost\""),
        "{e}"
    );
}

#[test]
fn lesson_solutions_are_attached_and_checked() {
    let lesson =
        "---\ntitle: A\nplayground: {name: debian}\ntasks:\n  t:\n    run: 'true'\n---\nx\n";
    let item = parse_bundle(
        "my-course",
        &bundle(&[
            ("index.md", "---\nkind: course\ntitle: C\n---\n"),
            ("01-m/01-a.md", lesson),
            ("01-m/01-a.solution.md", "```sh\ntrue\n```\n"),
            ("01-m/02-b.md", "---\ntitle: B\n---\ntext\n"),
        ]),
    )
    .expect("valid");
    let targets = item.solutions();
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].lesson.as_deref(), Some("01-m/01-a"));
    assert_eq!(targets[0].file, "01-m/01-a.md");
    let e = errors(
        "my-course",
        &[
            ("index.md", "---\nkind: course\ntitle: C\n---\n"),
            ("01-m/01-a.md", "---\ntitle: A\n---\nx\n"),
            ("01-m/01-a.solution.md", "```sh\ntrue\n```\n"),
            ("01-m/09-z.solution.md", "```sh\ntrue\n```\n"),
            ("01-m/Bad Name.md", "---\ntitle: A\n---\nx\n"),
        ],
    );
    assert!(
        e.contains("01-m/01-a.solution.md: a solution needs a playground"),
        "{e}"
    );
    assert!(
        e.contains("01-m/09-z.solution.md: there is no lesson 09-z.md"),
        "{e}"
    );
    assert!(
        e.contains("01-m/Bad Name.md: a lesson file's name must be"),
        "{e}"
    );
}
