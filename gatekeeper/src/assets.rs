//! Man pages and shell completions generated from the clap definitions, so
//! the package's documentation cannot drift from the CLI. The binary writes
//! them itself (`gatekeeper generate-assets DIR`, hidden): xtask cannot link
//! the gatekeeper crate, whose build embeds the eBPF object.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{ArgMatches, CommandFactory};
use clap_complete::Shell;

use crate::cli::Cli;

const BIN: &str = "gatekeeper";
pub const VERB: &str = "generate-assets";

/// The hidden verb, kept out of [`Cli`] so nothing generated from it shows it.
pub fn command() -> clap::Command {
    clap::Command::new(VERB)
        .hide(true)
        .about("Write the man pages and shell completions into DIR")
        .arg(
            clap::Arg::new("DIR")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf)),
        )
}

pub fn run(args: &ArgMatches) -> Result<()> {
    generate(args.get_one::<PathBuf>("DIR").expect("required by clap"))
}

/// Writes `DIR/man/gatekeeper.8` and one `gatekeeper-VERB[-ACTION].8` per
/// subcommand, and `DIR/completions/{gatekeeper.bash,_gatekeeper,gatekeeper.fish}`.
pub fn generate(dir: &Path) -> Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for sub in [&man, &completions] {
        std::fs::create_dir_all(sub).with_context(|| format!("creating {}", sub.display()))?;
    }
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    write_man_pages(&cmd, &man)?;
    for (shell, file) in [
        (Shell::Bash, "gatekeeper.bash"),
        (Shell::Zsh, "_gatekeeper"),
        (Shell::Fish, "gatekeeper.fish"),
    ] {
        let path = completions.join(file);
        let mut out =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        clap_complete::generate(shell, &mut cmd.clone(), BIN, &mut out);
    }
    Ok(())
}

/// Section 8: the binary lives in /usr/sbin.
fn write_man_pages(cmd: &clap::Command, dir: &Path) -> Result<()> {
    for sub in cmd.get_subcommands() {
        write_man_pages(sub, dir)?;
    }
    let page = clap_mangen::Man::new(cmd.clone())
        .section("8")
        .manual("System Administration");
    page.generate_to(dir)
        .with_context(|| format!("writing {}", dir.join(page.get_filename()).display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_page_and_completion() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path()).unwrap();
        let read = |rel: &str| std::fs::read_to_string(dir.path().join(rel)).unwrap();
        let main = read("man/gatekeeper.8");
        assert!(main.starts_with(".ie \\n(.g .ds Aq"), "{main:.80}");
        assert!(main.contains(".TH gatekeeper 8"), "{main:.300}");
        assert!(main.contains("gatekeeper\\-deny(8)"), "{main}");
        assert!(
            !main.contains("generate\\-assets"),
            "hidden verb documented"
        );
        assert!(!dir.path().join("man/gatekeeper-generate-assets.8").exists());
        assert!(read("man/gatekeeper-deny-add.8").contains("\\-\\-ttl"));
        assert!(read("man/gatekeeper-dnsbl-flush.8").contains("IP"));
        assert!(read("completions/gatekeeper.bash").contains("complete -F"));
        assert!(read("completions/_gatekeeper").starts_with("#compdef gatekeeper"));
        assert!(read("completions/gatekeeper.fish").contains("complete -c gatekeeper"));
        for file in ["gatekeeper.bash", "_gatekeeper", "gatekeeper.fish"] {
            assert!(
                !read(&format!("completions/{file}")).contains(VERB),
                "{file}"
            );
        }
    }
}
