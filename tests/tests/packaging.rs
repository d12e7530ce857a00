//! What a packager or an operator installs besides the binaries: shell completions and man
//! pages (from the binaries themselves), the systemd units and the Containerfile.
//!
//! - Completions: each binary's `completions bash` script parses (`bash -n`), registers itself
//!   (`complete -p`) and completes a flag, a subcommand and a subcommand's value when bash calls
//!   it as it would on TAB; the other shells' scripts name the binary the way that shell wants.
//! - Man pages: `man` renders with groff without a warning and names every flag's environment
//!   variable; `man --out DIR` writes one page per command and subcommand.
//! - systemd: every unit passes `systemd-analyze verify` (pointed at the built binaries) and
//!   keeps its sandboxing, with `systemd-analyze security` scoring it 2.0 or better.
//! - The Containerfile: a builder stage that builds the binaries named, runtime stages that
//!   run them as an unprivileged user, settings that are the binaries' own variables.
//!
//! bash, groff and systemd-analyze are required in CI (`.ci/run` installs them); elsewhere a
//! test without them says so and checks what it can.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clap::CommandFactory as _;
use shroud_tests::stack::binary;

/// The three binaries and their clap commands.
fn binaries() -> [(&'static str, clap::Command); 3] {
    [
        ("shroud", shroud_client::cli::Cli::command()),
        ("shroud-proxy", shroud_proxy::cli::Cli::command()),
        ("shroud-discovery", shroud_discovery::cli::Cli::command()),
    ]
}

/// The workspace's root directory.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A program the test needs: its path, or `None` (with a note) outside CI. In CI a missing
/// program fails the test: `.ci/run` installs it.
fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} (Debian package {package}) is required in CI and is not installed"
        );
        eprintln!("{name} is not installed (Debian package {package}): that check is left out");
    }
    found
}

/// Runs `program` with `args`; its output, which must be a success.
fn run(program: &Path, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|err| panic!("running {}: {err}", program.display()));
    assert!(
        output.status.success(),
        "{} {args:?} failed ({}): {}",
        program.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `BIN completions SHELL`.
fn completion_script(bin: &str, shell: &str) -> String {
    let output = run(&binary(bin), &["completions", shell]);
    String::from_utf8(output.stdout).unwrap()
}

/// What bash's completion function for `bin` offers for the command line `words`, the last
/// being the word under the cursor, called as bash calls it on TAB.
fn bash_complete(bash: &Path, script: &Path, bin: &str, words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let program = format!(
        r#"source '{script}' || exit 3
spec=$(complete -p {bin}) || exit 4
function=$(sed -n 's/.* -F \([^ ]*\) .*/\1/p' <<<"$spec")
[[ -n $function ]] || exit 5
COMP_WORDS=({words})
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
COMP_LINE="${{COMP_WORDS[*]}}"
COMP_POINT=${{#COMP_LINE}}
"$function" {bin} "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\n' "${{COMPREPLY[@]}}"
"#,
        script = script.display(),
        words = quoted.join(" "),
    );
    let output = run(bash, &["--norc", "--noprofile", "-c", &program]);
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn bash_completions_parse_register_and_complete() {
    let Some(bash) = tool("bash", "bash") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A flag of each binary's own, completed from its first letters.
    let flags = [
        ("shroud", "--proxy-proto", "--proxy-protocol"),
        ("shroud-proxy", "--tunnel-na", "--tunnel-name"),
        ("shroud-discovery", "--signing-k", "--signing-key"),
    ];
    for (bin, prefix, flag) in flags {
        let script = dir.path().join(format!("{bin}.bash"));
        std::fs::write(&script, completion_script(bin, "bash")).unwrap();
        run(&bash, &["-n", script.to_str().unwrap()]);

        assert_eq!(
            bash_complete(&bash, &script, bin, &[bin, prefix]),
            [flag],
            "{bin} {prefix}<TAB>"
        );
        assert_eq!(
            bash_complete(&bash, &script, bin, &[bin, "compl"]),
            ["completions"],
            "{bin} compl<TAB>"
        );
        // Past a subcommand: its own values (clap_complete needs a fix for hyphenated names).
        assert_eq!(
            bash_complete(&bash, &script, bin, &[bin, "completions", "f"]),
            ["fish"],
            "{bin} completions f<TAB>"
        );
        assert_eq!(
            bash_complete(&bash, &script, bin, &[bin, "man", "--o"]),
            ["--out"],
            "{bin} man --o<TAB>"
        );
    }
}

#[test]
fn other_shells_get_scripts_for_the_binary() {
    for (bin, _) in binaries() {
        let zsh = completion_script(bin, "zsh");
        assert!(zsh.starts_with(&format!("#compdef {bin}\n")), "{zsh}");
        let fish = completion_script(bin, "fish");
        assert!(fish.contains(&format!("complete -c {bin} ")), "{fish}");
        let elvish = completion_script(bin, "elvish");
        assert!(
            elvish.contains(&format!("edit:completion:arg-completer[{bin}]")),
            "{elvish}"
        );
        let powershell = completion_script(bin, "powershell");
        assert!(
            powershell.contains(&format!(
                "Register-ArgumentCompleter -Native -CommandName '{bin}'"
            )),
            "{powershell}"
        );
        // Where the shell is installed, it must also parse the script.
        for (shell, script, check) in [("zsh", &zsh, "-n"), ("fish", &fish, "--no-execute")] {
            let path = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|dir| dir.join(shell))
                .find(|path| path.is_file());
            if let Some(path) = path {
                let file = tempfile::NamedTempFile::new().unwrap();
                std::fs::write(file.path(), script).unwrap();
                run(&path, &[check, file.path().to_str().unwrap()]);
            }
        }
    }
    let err = Command::new(binary("shroud"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("possible values"),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );
}

/// `page` rendered by groff as plain text, one line per paragraph, no hyphenation; groff's
/// warnings (all of them on) must be none.
fn render(groff: &Path, page: &Path) -> String {
    let output = run(
        groff,
        &[
            "-man",
            "-Tutf8",
            "-ww",
            "-P-cbou",
            "-rLL=1000n",
            "-rHY=0",
            page.to_str().unwrap(),
        ],
    );
    let warnings = String::from_utf8_lossy(&output.stderr);
    assert!(
        warnings.trim().is_empty(),
        "groff warns about {}: {warnings}",
        page.display()
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The environment variables of `command`'s own arguments (not its subcommands').
fn own_env_names(command: &clap::Command) -> BTreeSet<String> {
    command
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_str().unwrap().to_owned())
        .collect()
}

#[test]
fn man_pages_render_and_name_every_flags_variable() {
    let groff = tool("groff", "groff-base");
    let dir = tempfile::tempdir().unwrap();
    for (bin, command) in binaries() {
        let roff = run(&binary(bin), &["man"]).stdout;
        let roff = String::from_utf8(roff).unwrap();
        assert!(roff.contains(&format!("\n.TH {bin} 1 ")), "{roff}");
        for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SUBCOMMANDS"] {
            assert!(
                roff.contains(&format!("\n.SH {section}\n")),
                "{bin}: no {section}"
            );
        }
        let names = own_env_names(&command);
        assert!(names.len() >= 3, "{bin}: {names:?}");
        let page = dir.path().join(format!("{bin}.1"));
        std::fs::write(&page, &roff).unwrap();
        let text = match &groff {
            Some(groff) => render(groff, &page),
            None => roff
                .replace("\\-", "-")
                .replace("\\fB", "")
                .replace("\\fR", ""),
        };
        for name in &names {
            assert!(
                text.contains(&format!(
                    "May also be specified with the {name} environment variable"
                )),
                "{bin}: the page does not name {name}"
            );
        }
    }
}

#[test]
fn man_out_writes_a_page_per_command_and_subcommand() {
    let groff = tool("groff", "groff-base");
    let dir = tempfile::tempdir().unwrap();
    for (bin, command) in binaries() {
        let out = dir.path().join(bin).join("man1");
        let listed = run(&binary(bin), &["man", "--out", out.to_str().unwrap()]).stdout;
        let listed: Vec<PathBuf> = String::from_utf8(listed)
            .unwrap()
            .lines()
            .map(PathBuf::from)
            .collect();
        let mut expected = vec![format!("{bin}.1")];
        for sub in command.get_subcommands() {
            expected.push(format!("{bin}-{}.1", sub.get_name()));
        }
        let names: BTreeSet<String> = listed
            .iter()
            .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, expected.into_iter().collect(), "{bin}");
        for path in &listed {
            assert_eq!(path.parent(), Some(out.as_path()));
            if let Some(groff) = &groff {
                render(groff, path);
            }
        }
        // A subcommand's page names its own variables (`shroud key`: SHROUD_KEY).
        for sub in command.get_subcommands() {
            let page = out.join(format!("{bin}-{}.1", sub.get_name()));
            let roff = std::fs::read_to_string(&page).unwrap();
            for name in own_env_names(sub) {
                assert!(roff.contains(&name), "{}: no {name}", page.display());
            }
        }
    }
}

/// The units, under the names systemd would load them by.
const UNITS: [(&str, &str); 3] = [
    ("shroud-proxy.service", "shroud-proxy.service"),
    ("shroud-discovery.service", "shroud-discovery.service"),
    ("shroud@.service", "shroud@app.example.com.service"),
];

/// deploy/systemd copied into a temporary directory, each unit's /usr/local/bin/ pointing at
/// the binaries just built (systemd-analyze checks that ExecStart's program exists).
fn units_with_built_binaries() -> tempfile::TempDir {
    let source = workspace().join("deploy/systemd");
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = binary("shroud").parent().unwrap().to_owned();
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        let to = dir.path().join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir(&to).unwrap();
            for file in std::fs::read_dir(entry.path()).unwrap() {
                let file = file.unwrap();
                std::fs::copy(file.path(), to.join(file.file_name())).unwrap();
            }
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap();
        let local = format!("{}/", bin_dir.display());
        std::fs::write(&to, text.replace("/usr/local/bin/", &local)).unwrap();
    }
    dir
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    // Each unit names its binary in /usr/local/bin/, where the copy points at the built one.
    for (file, _) in UNITS {
        let text = std::fs::read_to_string(workspace().join("deploy/systemd").join(file)).unwrap();
        let exec = text
            .lines()
            .find_map(|line| line.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{file}: no ExecStart="));
        assert!(exec.starts_with("/usr/local/bin/shroud"), "{file}: {exec}");
        assert!(
            text.contains("\nExecReload=/bin/kill -HUP $MAINPID\n"),
            "{file}: reload is SIGHUP"
        );
    }
    let Some(analyze) = tool("systemd-analyze", "systemd") else {
        return;
    };
    let dir = units_with_built_binaries();
    for (_, unit) in UNITS {
        let path = dir.path().join(unit);
        let output = Command::new(&analyze)
            .args(["verify", "--man=no", path.to_str().unwrap()])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout);
        // verify exits 0 on an unknown key or a bad value, and only says so: any word about
        // our files is a failure. (Lines about the host's own units are not ours to judge.)
        let ours: Vec<&str> = said
            .lines()
            .filter(|line| line.contains("shroud") || line.contains(&*dir.path().to_string_lossy()))
            .collect();
        assert!(
            output.status.success() && ours.is_empty(),
            "systemd-analyze verify {unit} ({}): {said}",
            output.status
        );
    }
}

/// The sandboxing every unit keeps; systemd-analyze's score below sums up the rest.
const SANDBOXING: [&str; 22] = [
    "NoNewPrivileges=yes",
    "UMask=0077",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "PrivateMounts=yes",
    "ProtectProc=invisible",
    "ProcSubset=pid",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
    "MemoryDenyWriteExecute=yes",
    "SystemCallArchitectures=native",
    "SystemCallFilter=~@privileged @resources",
];

/// The worst exposure `systemd-analyze security` may give a unit (0 is best, 10 worst; these
/// score 1.4 to 1.6, "OK").
const MAX_EXPOSURE: f64 = 2.0;

#[test]
fn systemd_units_keep_their_sandboxing() {
    for (file, _) in UNITS {
        let text = std::fs::read_to_string(workspace().join("deploy/systemd").join(file)).unwrap();
        let lines: BTreeSet<&str> = text.lines().map(str::trim).collect();
        for setting in SANDBOXING {
            assert!(lines.contains(setting), "{file} lost {setting}");
        }
        let user = lines
            .iter()
            .find_map(|line| line.strip_prefix("User="))
            .unwrap_or_else(|| panic!("{file}: no User="));
        assert!(!matches!(user, "" | "root" | "0"), "{file}: User={user}");
    }
    let Some(analyze) = tool("systemd-analyze", "systemd") else {
        return;
    };
    let dir = units_with_built_binaries();
    for (_, unit) in UNITS {
        let path = dir.path().join(unit);
        let output = run(
            &analyze,
            &[
                "security",
                "--offline=true",
                "--no-pager",
                path.to_str().unwrap(),
            ],
        );
        let text = String::from_utf8_lossy(&output.stdout);
        let exposure: f64 = text
            .lines()
            .find_map(|line| {
                let (_, rest) = line.split_once("Overall exposure level for ")?;
                rest.split_once(": ")?
                    .1
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no overall exposure for {unit}: {text}"));
        assert!(
            exposure <= MAX_EXPOSURE,
            "{unit}: exposure {exposure} > {MAX_EXPOSURE}: {text}"
        );
        eprintln!("{unit}: systemd-analyze security exposure {exposure}");
    }
}

/// One instruction of a Containerfile: its keyword (upper case) and the rest, continuation
/// lines joined.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    joined
        .into_iter()
        .map(|line| {
            let (keyword, rest) = line.split_once(' ').unwrap_or((&line, ""));
            (keyword.to_ascii_uppercase(), rest.trim().to_owned())
        })
        .collect()
}

/// A stage of a multi-stage build.
#[derive(Debug, Default)]
struct Stage {
    from: String,
    instructions: Vec<(String, String)>,
}

/// The stages by name, in order.
fn stages(text: &str) -> Vec<(String, Stage)> {
    let mut stages: Vec<(String, Stage)> = Vec::new();
    for (keyword, rest) in instructions(text) {
        if keyword == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let name = match words[..] {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => name.to_owned(),
                _ => panic!("every stage is named: FROM {rest}"),
            };
            let from = words[0].to_owned();
            stages.push((
                name,
                Stage {
                    from,
                    instructions: Vec::new(),
                },
            ));
        } else if let Some((_, stage)) = stages.last_mut() {
            stage.instructions.push((keyword, rest));
        } else {
            assert_eq!(keyword, "ARG", "only ARG comes before the first FROM");
        }
    }
    stages
}

/// The packages of the workspace and their binaries.
fn workspace_binaries() -> BTreeMap<String, Vec<String>> {
    let manifest: toml::Table = std::fs::read_to_string(workspace().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let members = manifest["workspace"]["members"].as_array().unwrap();
    let mut packages = BTreeMap::new();
    for member in members {
        let path = workspace()
            .join(member.as_str().unwrap())
            .join("Cargo.toml");
        let crate_manifest: toml::Table = std::fs::read_to_string(path).unwrap().parse().unwrap();
        let name = crate_manifest["package"]["name"]
            .as_str()
            .unwrap()
            .to_owned();
        let bins = crate_manifest
            .get("bin")
            .and_then(|bins| bins.as_array())
            .map(|bins| {
                bins.iter()
                    .map(|bin| bin["name"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        packages.insert(name, bins);
    }
    packages
}

#[test]
fn the_containerfile_builds_the_binaries_and_runs_them_unprivileged() {
    let text = std::fs::read_to_string(workspace().join("deploy/Containerfile")).unwrap();
    let stages = stages(&text);
    let names: Vec<&str> = stages.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["builder", "runtime", "discovery", "proxy"]);
    let stage = |name: &str| &stages.iter().find(|(n, _)| n == name).unwrap().1;

    // The builder: Rust on Debian 12, the locked dependency versions, the packages named.
    let builder = stage("builder");
    assert!(
        builder.from.starts_with("docker.io/library/rust:") && builder.from.ends_with("-bookworm"),
        "{}",
        builder.from
    );
    let build = builder
        .instructions
        .iter()
        .find(|(keyword, rest)| keyword == "RUN" && rest.contains("cargo build"))
        .map(|(_, rest)| rest.as_str())
        .expect("a cargo build");
    let words: Vec<&str> = build.split_whitespace().collect();
    for flag in ["--release", "--locked"] {
        assert!(words.contains(&flag), "cargo build without {flag}: {build}");
    }
    let packages = workspace_binaries();
    let built: Vec<&str> = words
        .windows(2)
        .filter(|pair| pair[0] == "-p")
        .map(|pair| pair[1])
        .collect();
    assert_eq!(built, ["shroud-proxy", "shroud-discovery"]);
    for package in &built {
        assert!(
            packages[*package].iter().any(|bin| bin == package),
            "{package} has no binary of its name: {packages:?}"
        );
    }

    // The runtime: distroless (no shell, so no RUN and no shell-form command).
    let runtime = stage("runtime");
    assert!(
        runtime.from.starts_with("gcr.io/distroless/cc-debian12"),
        "{}",
        runtime.from
    );
    let commands = [
        (
            "discovery",
            "shroud-discovery",
            shroud_discovery::cli::Cli::command(),
        ),
        ("proxy", "shroud-proxy", shroud_proxy::cli::Cli::command()),
    ];
    for (name, bin, command) in commands {
        let stage = stage(name);
        assert_eq!(stage.from, "runtime", "{name}");
        let all: Vec<&(String, String)> = runtime
            .instructions
            .iter()
            .chain(&stage.instructions)
            .collect();
        assert!(
            all.iter()
                .all(|(keyword, _)| keyword != "RUN" && keyword != "HEALTHCHECK"),
            "{name}: nothing may need a shell at run time"
        );
        let user = all
            .iter()
            .rev()
            .find(|(keyword, _)| keyword == "USER")
            .map(|(_, user)| user.as_str())
            .unwrap_or_else(|| panic!("{name}: no USER"));
        let uid = user.split(':').next().unwrap();
        assert!(!matches!(uid, "root" | "0" | ""), "{name}: USER {user}");
        assert_eq!(stage.instructions.last().unwrap().0, "ENTRYPOINT", "{name}");

        let installed = format!("/usr/local/bin/{bin}");
        let copy = format!("--from=builder /out/{bin} {installed}");
        assert!(
            stage
                .instructions
                .iter()
                .any(|(k, rest)| k == "COPY" && *rest == copy),
            "{name}: COPY {copy}"
        );
        assert!(
            build.contains(&format!("target/release/{bin} /out/{bin}")),
            "{name}: the builder puts {bin} in /out"
        );
        let entrypoint = &stage.instructions.last().unwrap().1;
        let entrypoint: Vec<String> = serde_json::from_str(entrypoint)
            .unwrap_or_else(|err| panic!("{name}: ENTRYPOINT in exec form: {err}"));
        assert_eq!(entrypoint, [installed], "{name}");

        // Every setting is one of the binary's variables; the ports listened on are exposed.
        let variables = env_names(&command);
        let mut exposed = BTreeSet::new();
        let mut listened = BTreeSet::new();
        for (keyword, rest) in &stage.instructions {
            match keyword.as_str() {
                "ENV" => {
                    for pair in rest.split_whitespace() {
                        let (key, value) = pair.split_once('=').expect("ENV KEY=VALUE");
                        assert!(variables.contains(key), "{name}: {key} is not {bin}'s");
                        if key.ends_with("LISTEN") || key.contains("LISTEN_HTTP") {
                            let port: u16 = value.rsplit_once(':').unwrap().1.parse().unwrap();
                            assert!(port > 1024, "{name}: {key}={value} needs a capability");
                            listened.insert(port);
                        }
                    }
                }
                "EXPOSE" => {
                    for port in rest.split_whitespace() {
                        exposed.insert(port.trim_end_matches("/tcp").parse::<u16>().unwrap());
                    }
                }
                _ => {}
            }
        }
        assert!(!listened.is_empty(), "{name}: no listener set");
        assert_eq!(exposed, listened, "{name}: EXPOSE what it listens on");
    }
    assert_eq!(
        names.last(),
        Some(&"proxy"),
        "the default target is the proxy"
    );

    // The build context leaves out target/.
    let ignore = std::fs::read_to_string(workspace().join(".dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|line| line.trim() == "target"),
        "{ignore}"
    );
}

/// The environment variables a clap command (and its subcommands) reads.
fn env_names(command: &clap::Command) -> BTreeSet<String> {
    let mut names = own_env_names(command);
    for sub in command.get_subcommands() {
        names.extend(env_names(sub));
    }
    names
}
