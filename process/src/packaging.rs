//! The `completions` and `man` subcommands: shell completion scripts and manual pages, made
//! from a binary's own clap command, so they can never describe flags it no longer has.
//!
//! Each binary adds [`CompletionsArgs`] and [`ManArgs`] as subcommands and hands its
//! `Cli::command()` to [`print_completions`] or [`write_man_pages`]. The man pages carry each
//! flag's environment variable (`May also be specified with the SHROUD_... environment
//! variable`), never a value read from the environment.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The shells `completions` knows: bash, elvish, fish, powershell, zsh.
pub use clap_complete::Shell;

/// Options of `completions`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to print a completion script for
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: Shell,
}

/// Options of `man`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write one page per command and subcommand (NAME.1, NAME-SUBCOMMAND.1) into DIR, made if
    /// missing, and print their paths, instead of printing the binary's own page
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Why a completion script or man page could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PackagingError {
    /// Stdout failed for a reason other than its reader having gone.
    #[error("writing to stdout: {0}")]
    Stdout(#[source] io::Error),
    /// A page could not be written into `--out`.
    #[error("writing {}: {source}", path.display())]
    File {
        /// The file or directory that could not be written.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// Prints `command`'s completion script for `shell` on stdout. The script completes the
/// command's own name (`shroud`, `shroud-proxy`, ...).
///
/// A reader that closes stdout early is no error.
pub fn print_completions(command: clap::Command, shell: Shell) -> Result<(), PackagingError> {
    write_stdout(&completions(command, shell))
}

/// `command`'s completion script for `shell`.
pub fn completions(mut command: clap::Command, shell: Shell) -> Vec<u8> {
    let name = command.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, name.clone(), &mut script);
    if shell == Shell::Bash {
        script = fix_bash_subcommand_states(&script, &name);
    }
    script
}

/// clap_complete (up to 4.6.12 at least: clap issue #6421) spells the bash script's states for
/// a hyphenated name's subcommands two ways: the loop that reads the words reaches
/// `shroud__proxy__subcmd__man`, the `case` that completes it waits for
/// `shroud__subcmd__proxy__subcmd__man`, so nothing after a subcommand of `shroud-proxy` or
/// `shroud-discovery` would complete. This spells the arms as the loop does.
fn fix_bash_subcommand_states(script: &[u8], name: &str) -> Vec<u8> {
    const SEPARATOR: &str = "__subcmd__";
    let (Ok(text), true) = (std::str::from_utf8(script), name.contains('-')) else {
        return script.to_vec();
    };
    let wrong = format!("{}{SEPARATOR}", name.replace('-', SEPARATOR));
    let right = format!("{}{SEPARATOR}", name.replace('-', "__"));
    text.replace(&wrong, &right).into_bytes()
}

/// With `--out DIR`, writes a page for `command` and one for each of its subcommands into DIR
/// and prints the paths written, one a line; without, prints `command`'s own page (roff, for
/// `man -l -`).
pub fn write_man_pages(command: clap::Command, args: &ManArgs) -> Result<(), PackagingError> {
    match &args.out {
        None => write_stdout(&man_page(command)),
        Some(dir) => {
            let written = man_pages_to(command, dir)?;
            let mut list = String::new();
            for path in written {
                list.push_str(&path.display().to_string());
                list.push('\n');
            }
            write_stdout(list.as_bytes())
        }
    }
}

/// `command`'s own manual page, in roff.
pub fn man_page(command: clap::Command) -> Vec<u8> {
    let mut page = Vec::new();
    // Writing to a Vec cannot fail.
    let _infallible = clap_mangen::Man::new(built(command)).render(&mut page);
    page
}

/// Writes `command`'s page and its subcommands' pages (hidden ones left out) into `dir`, making
/// it if missing; returns the paths written, the command's own page first.
pub fn man_pages_to(command: clap::Command, dir: &Path) -> Result<Vec<PathBuf>, PackagingError> {
    std::fs::create_dir_all(dir).map_err(|source| PackagingError::File {
        path: dir.to_owned(),
        source,
    })?;
    let mut written = Vec::new();
    write_pages(&built(command), dir, &mut written)?;
    Ok(written)
}

/// `command` as clap completes it before parsing: subcommands named `PARENT-CHILD`, with the
/// `help` and `--version` it adds. No `help` subcommand: it would get a page of its own.
fn built(command: clap::Command) -> clap::Command {
    let mut command = command.disable_help_subcommand(true);
    command.build();
    command
}

fn write_pages(
    command: &clap::Command,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<(), PackagingError> {
    let man = clap_mangen::Man::new(command.clone());
    let path = dir.join(man.get_filename());
    man.generate_to(dir)
        .map_err(|source| PackagingError::File {
            path: path.clone(),
            source,
        })?;
    written.push(path);
    for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    Ok(())
}

/// Writes `bytes` to stdout, treating a closed pipe as success.
fn write_stdout(bytes: &[u8]) -> Result<(), PackagingError> {
    let mut stdout = io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(err) if err.kind() != io::ErrorKind::BrokenPipe => Err(PackagingError::Stdout(err)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser, Subcommand};

    /// A command shaped like the binaries': flags with variables, a subcommand.
    #[derive(Debug, Parser)]
    #[command(name = "demo", version)]
    struct Demo {
        /// Where to listen
        #[arg(long, env = "SHROUD_DEMO_LISTEN", value_name = "ADDR")]
        listen: Option<String>,
        /// A secret
        #[arg(long, env = "SHROUD_DEMO_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(subcommand)]
        command: Option<DemoCommand>,
    }

    #[derive(Debug, Subcommand)]
    enum DemoCommand {
        /// Print a key
        Key,
        /// Print completions
        Completions(CompletionsArgs),
        /// Print man pages
        Man(ManArgs),
    }

    #[test]
    fn the_page_names_each_flag_and_its_variable() {
        let page = String::from_utf8(man_page(Demo::command())).unwrap();
        assert!(page.contains("\n.TH demo 1 "), "{page}");
        assert!(page.contains(".SH OPTIONS"), "{page}");
        assert!(
            page.contains("\\fB\\-\\-listen\\fR \\fI<ADDR>\\fR"),
            "{page}"
        );
        assert!(
            page.contains("specified with the \\fBSHROUD_DEMO_LISTEN\\fR environment variable"),
            "{page}"
        );
        assert!(page.contains("SHROUD_DEMO_TOKEN"), "{page}");
        assert!(page.contains("demo\\-key(1)"), "{page}");
    }

    #[test]
    fn out_writes_a_page_per_command_and_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("man1");
        let written = man_pages_to(Demo::command(), &out).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["demo.1", "demo-key.1", "demo-completions.1", "demo-man.1"]
        );
        for path in &written {
            let page = std::fs::read_to_string(path).unwrap();
            assert!(page.contains(".TH "), "{}: {page}", path.display());
        }
    }

    #[test]
    fn out_into_a_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "").unwrap();
        let err = man_pages_to(Demo::command(), &file).unwrap_err();
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }

    #[test]
    fn bash_states_of_a_hyphenated_name_are_spelt_one_way() {
        let command = Demo::command().name("demo-app");
        let script = String::from_utf8(completions(command, Shell::Bash)).unwrap();
        assert!(!script.contains("demo__subcmd__app"), "{script}");
        // The loop's spelling and the case arm's are the same.
        assert!(
            script.contains("cmd=\"demo__app__subcmd__man\""),
            "{script}"
        );
        assert!(
            script.contains("        demo__app__subcmd__man)"),
            "{script}"
        );
    }

    #[test]
    fn every_shell_gets_a_script_naming_the_command() {
        for shell in [
            Shell::Bash,
            Shell::Zsh,
            Shell::Fish,
            Shell::Elvish,
            Shell::PowerShell,
        ] {
            let script = String::from_utf8(completions(Demo::command(), shell)).unwrap();
            assert!(script.contains("demo"), "{shell}: {script}");
            assert!(script.contains("listen"), "{shell}: {script}");
            assert!(script.contains("completions"), "{shell}: {script}");
        }
    }
}
