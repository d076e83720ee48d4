//! The `resbisect` command line: parse the arguments, run the command, map the outcome
//! to an exit code (README.md, "Exit codes"). The commands live in `cli/`, everything
//! else in the library.

mod cli;

use std::process::ExitCode;

use cli::args::{Cli, Command};
use cli::{backend, bisect, calibrate, commands, demo, inspect, one_line};
use resbisect::{Error, Result};

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Dump(a) => commands::dump(a),
        Command::Run(a) => commands::run(a),
        Command::Inspect(a) => inspect::inspect(a).map(|()| ExitCode::SUCCESS),
        Command::ModelInfo(a) => inspect::model_info(a).map(|()| ExitCode::SUCCESS),
        Command::Tokenize(a) => commands::tokenize(a),
        Command::Diff(a) => commands::diff(a),
        Command::Calibrate(a) => calibrate::calibrate(a),
        Command::Report { kind } => commands::report(kind),
        Command::Bisect(a) => bisect::bisect(a),
        Command::Demo(a) => demo::demo(a),
        Command::Selftest(a) => backend::selftest(a),
        Command::Cut(a) => commands::cut(a),
        Command::Synth(a) => commands::synth(a),
    }
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`resbisect inspect D | head`), as Unix tools do.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    resbisect::trace::init();
    resbisect::trace::set_notice_sink(|line| eprintln!("note: {line}"));
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let outcome = dispatch(cli.command);
    resbisect::trace::mark(|| "done; exiting".into());
    let code = match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e.to_string()));
            ExitCode::from(match e {
                Error::Input(_) => 2,
                Error::Engine(_) => 3,
            })
        }
    };
    exit_now(code)
}

/// The arguments, where a value that reads as a negative number (`--layers -1`) is a value,
/// so that its option's own check names what is wrong with it, not an unknown argument.
fn parse_args() -> std::result::Result<Cli, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    fn negative_values(c: clap::Command) -> clap::Command {
        c.allow_negative_numbers(true).mut_subcommands(negative_values)
    }
    let mut command = negative_values(Cli::command());
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(e) = missing_hyphen_value(&mut command, &args) {
        return Err(e);
    }
    Cli::from_arg_matches(&command.try_get_matches_from(args)?)
}

/// An option that takes values starting with a hyphen (`--positions -8..`) would take the
/// next option as its value when its own was left out (`--positions --taps all`), and
/// the error would then name a stray argument; this names the option.
fn missing_hyphen_value(command: &mut clap::Command, args: &[std::ffi::OsString]) -> Option<clap::Error> {
    let name = args.get(1)?.to_str()?;
    let sub = command.find_subcommand(name)?;
    let takes_hyphens: Vec<String> = sub
        .get_arguments()
        .filter(|a| a.is_allow_hyphen_values_set())
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect();
    let mut rest = args[2..].iter().map(|a| a.to_str());
    while let Some(arg) = rest.next() {
        if arg == Some("--") {
            return None;
        }
        let Some(option) = arg.filter(|a| takes_hyphens.iter().any(|t| t == a)) else {
            continue;
        };
        match rest.next() {
            Some(Some(next)) if next.starts_with("--") => {
                let message = format!("a value is required for '{option}' (found the option '{next}' instead)");
                return Some(command.error(clap::error::ErrorKind::InvalidValue, message));
            }
            _ => continue,
        }
    }
    None
}

/// End the process with `code` once stdout and stderr are flushed, without the exit
/// handlers: every file is written and closed by now, and the GPU driver's handlers
/// would tear down a context that the operating system frees anyway (30–50 ms of a
/// process's exit on an H200, docs/validation.md).
fn exit_now(code: ExitCode) -> ExitCode {
    use std::io::Write;
    let Some(value) = (0..=3).find(|&n| ExitCode::from(n) == code) else {
        return code;
    };
    let flushed = std::io::stdout().flush().is_ok() && std::io::stderr().flush().is_ok();
    if !flushed {
        // A closed pipe or a full disk: the normal exit reports nothing more, but loses nothing.
        return code;
    }
    // SAFETY: _exit ends the process; every thread's work that matters has been joined.
    unsafe { libc::_exit(i32::from(value)) }
}

/// Help and version print as clap writes them; a usage error is one line, as every
/// other bad input (clap's usage and tip lines would bury it), exit 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let mut text = e.to_string();
    // A value with a line break or a terminal escape is shown escaped, on the one line.
    if let Some(clap::error::ContextValue::String(value)) = e.get(clap::error::ContextKind::InvalidValue) {
        text = text.replacen(value.as_str(), &value.escape_debug().to_string(), 1);
    }
    let mut lines = text.lines().skip_while(|l| l.trim().is_empty());
    let mut line = lines.next().unwrap_or("error: bad arguments").to_string();
    // "the following required arguments were not provided:" lists them indented below.
    if line.ends_with(':') {
        let listed: Vec<&str> = lines
            .take_while(|l| l.starts_with(char::is_whitespace) && !l.trim().is_empty())
            .map(str::trim)
            .collect();
        line = format!("{line} {}", listed.join(", "));
    }
    // The values an enum option takes, which clap lists on a line of their own.
    if let Some(clap::error::ContextValue::Strings(valid)) = e.get(clap::error::ContextKind::ValidValue) {
        if !valid.is_empty() {
            line = format!("{line} (possible values: {})", valid.join(", "));
        }
    }
    eprintln!("{line}");
    ExitCode::from(2)
}
