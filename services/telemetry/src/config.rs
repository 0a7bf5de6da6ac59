//! A service's configuration from three places, in rising precedence: an
//! optional TOML file (`--config FILE`, or `CHAT_CONFIG`), the `CHAT_*`
//! environment variables, and command-line flags. A file's keys are the
//! flags' long names (`max-queue-ms = 300`; `max_queue_ms` reads the same);
//! a list is an array (`routers = ["router-1:7101", "router-2:7101"]`), a
//! switch is `true` or `false`.
//!
//! Everything is checked before the service does anything else (binds a
//! port, opens its data): an unknown key, a value of the wrong type or one
//! its flag would refuse is an error naming the file and the key, and the
//! process exits with status 2, as for a bad flag. `--print-config` prints
//! the effective configuration as TOML, each value with where it came from
//! (secrets, the values whose environment variables are hidden, redacted),
//! and exits.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command, CommandFactory, FromArgMatches};

const CONFIG: &str = "config";
const PRINT: &str = "print-config";
const CONFIG_ENV: &str = "CHAT_CONFIG";

/// Parses the process's configuration (see the module's documentation).
/// Exits with status 2 and a message on a bad file, key or value; with
/// `--print-config`, prints the configuration and exits with 0.
pub fn load<T: CommandFactory + FromArgMatches>() -> T {
    let (config, matches, cmd, from_file) = match parse::<T>(std::env::args_os().collect()) {
        Ok(parsed) => parsed,
        Err(Error::Clap(e)) => e.exit(),
        Err(Error::File(msg)) => {
            eprintln!("{}: {msg}", T::command().get_name());
            std::process::exit(2);
        }
    };
    if matches.get_flag(PRINT) {
        print!("{}", effective(&cmd, &matches, &from_file));
        std::process::exit(0);
    }
    config
}

#[derive(Debug)]
pub enum Error {
    /// A flag or environment variable clap refused (its own message).
    Clap(clap::Error),
    /// The file, or a key or value in it.
    File(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Clap(e) => write!(f, "{e}"),
            Error::File(m) => f.write_str(m),
        }
    }
}

/// The command with the two options every service takes.
fn command<T: CommandFactory>() -> Command {
    T::command()
        .arg(
            Arg::new(CONFIG)
                .long(CONFIG)
                .env(CONFIG_ENV)
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help("TOML file of settings, keyed by flag name; the environment and flags override it"),
        )
        .arg(
            Arg::new(PRINT)
                .long(PRINT)
                .action(ArgAction::SetTrue)
                .help("Print the effective configuration and where each value came from, then exit"),
        )
}

/// The configuration from `argv` (the program's name first), the file it
/// names and the environment; with the matches, the command and the keys
/// the file supplied (for `--print-config`).
pub fn parse<T: CommandFactory + FromArgMatches>(
    argv: Vec<OsString>,
) -> Result<(T, ArgMatches, Command, Vec<String>), Error> {
    let cmd = command::<T>();
    let given = flags_given(&argv);
    let path = config_path(&argv);
    let mut injected: Vec<OsString> = Vec::new();
    // The settings the file supplied: (flag name, key as the file wrote it).
    let mut written: Vec<(String, String)> = Vec::new();
    if let Some(path) = &path {
        for (key, raw_key, values) in read_file(&cmd, path)? {
            let arg = find(&cmd, &key).expect("read_file checked the key");
            let env_set = arg
                .get_env()
                .is_some_and(|e| std::env::var_os(e).is_some_and(|v| !v.is_empty()));
            if given.iter().any(|g| g == &key) || env_set {
                continue;
            }
            written.push((key.clone(), raw_key));
            match values {
                FileValue::Switch(true) => injected.push(format!("--{key}").into()),
                FileValue::Switch(false) => {}
                FileValue::Values(vs) => {
                    for v in vs {
                        injected.push(format!("--{key}={v}").into());
                    }
                }
            }
        }
    }
    let mut full = Vec::with_capacity(argv.len() + injected.len());
    let mut args = argv.into_iter();
    full.extend(args.next());
    full.extend(injected);
    full.extend(args);
    let matches = cmd
        .clone()
        .try_get_matches_from(full)
        .map_err(|e| in_file(e, path.as_deref(), &written))?;
    let config = T::from_arg_matches(&matches).map_err(Error::Clap)?;
    let from_file = written.into_iter().map(|(key, _)| key).collect();
    Ok((config, matches, cmd, from_file))
}

/// clap's error, said of the file's key when the value it refused came
/// from the file.
fn in_file(e: clap::Error, path: Option<&Path>, written: &[(String, String)]) -> Error {
    use clap::error::{ContextKind, ContextValue};
    let (Some(path), Some(ContextValue::String(arg))) = (path, e.get(ContextKind::InvalidArg))
    else {
        return Error::Clap(e);
    };
    let name = arg
        .trim_start_matches('-')
        .split([' ', '=', '<'])
        .next()
        .unwrap_or_default();
    match written.iter().find(|(key, _)| key == name) {
        Some((_, raw_key)) => Error::File(format!(
            "config file {}: key `{raw_key}`: {}",
            path.display(),
            first_line(&e.to_string())
        )),
        None => Error::Clap(e),
    }
}

/// The long flags named on the command line (`--name` or `--name=value`).
fn flags_given(argv: &[OsString]) -> Vec<String> {
    argv.iter()
        .skip(1)
        .take_while(|a| a.as_os_str() != OsStr::new("--"))
        .filter_map(|a| a.to_str()?.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_owned())
        .collect()
}

/// `--config FILE`, `--config=FILE` or `CHAT_CONFIG`.
fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut args = argv.iter().skip(1);
    while let Some(a) = args.next() {
        let Some(s) = a.to_str() else { continue };
        if s == "--" {
            break;
        }
        if s == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(p) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os(CONFIG_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Whether `arg` is one of the service's settings (not help, version,
/// `--config` or `--print-config`).
fn is_setting(arg: &Arg) -> bool {
    !matches!(arg.get_id().as_str(), CONFIG | PRINT)
        && !matches!(arg.get_action(), ArgAction::Help | ArgAction::Version)
}

fn find<'a>(cmd: &'a Command, key: &str) -> Option<&'a Arg> {
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(key) && is_setting(a))
}

enum FileValue {
    Switch(bool),
    Values(Vec<String>),
}

/// The file's settings: (flag name, key as written, value). Their values
/// are checked by the flags' own parsers in `parse`.
fn read_file(cmd: &Command, path: &Path) -> Result<Vec<(String, String, FileValue)>, Error> {
    let here = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::File(format!("config file {here}: cannot read it: {e}")))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| Error::File(format!("config file {here}: not valid TOML: {e}")))?;
    let mut out = Vec::new();
    for (raw_key, value) in table {
        let key = raw_key.replace('_', "-");
        let bad = |why: String| Error::File(format!("config file {here}: key `{raw_key}`: {why}"));
        let Some(arg) = find(cmd, &key) else {
            return Err(bad(format!(
                "no such setting (the keys are {}'s flag names: `{} --help`)",
                cmd.get_name(),
                cmd.get_name()
            )));
        };
        let switch = matches!(arg.get_action(), ArgAction::SetTrue);
        let many = matches!(arg.get_action(), ArgAction::Append);
        let scalar = |v: &toml::Value| -> Result<String, Error> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                toml::Value::Boolean(b) => Ok(b.to_string()),
                other => Err(bad(format!(
                    "expected a single value, found {}",
                    other.type_str()
                ))),
            }
        };
        let parsed = match (&value, switch) {
            (toml::Value::Boolean(b), true) => FileValue::Switch(*b),
            (other, true) => {
                return Err(bad(format!(
                    "a switch: expected true or false, found {}",
                    other.type_str()
                )));
            }
            (toml::Value::Array(items), false) if many => {
                FileValue::Values(items.iter().map(scalar).collect::<Result<_, _>>()?)
            }
            (toml::Value::Array(_), false) => {
                return Err(bad("takes one value, not a list".into()));
            }
            (v, false) => FileValue::Values(vec![scalar(v)?]),
        };
        out.push((key, raw_key, parsed));
    }
    Ok(out)
}

/// clap's message without its "error: " prefix and usage lines.
fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or(message);
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

/// The effective configuration as TOML, each value with its source.
pub fn effective(cmd: &Command, matches: &ArgMatches, from_file: &[String]) -> String {
    let mut out = String::from("# effective configuration: value  # where it came from\n");
    for arg in cmd.get_arguments().filter(|a| is_setting(a)) {
        let id = arg.get_id().as_str();
        let Some(long) = arg.get_long() else { continue };
        let source = match matches.value_source(id) {
            None => {
                out.push_str(&format!("# {long} = (not set)\n"));
                continue;
            }
            Some(ValueSource::DefaultValue) => "default",
            Some(ValueSource::EnvVariable) => "environment",
            Some(_) if from_file.iter().any(|k| k == long) => "file",
            Some(_) => "flag",
        };
        let raw: Vec<String> = matches
            .get_raw(id)
            .into_iter()
            .flatten()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let value = if arg.is_hide_env_values_set() {
            "\"(hidden)\"".to_owned()
        } else if matches!(arg.get_action(), ArgAction::SetTrue) {
            matches.get_flag(id).to_string()
        } else if matches!(arg.get_action(), ArgAction::Append) {
            format!(
                "[{}]",
                raw.iter()
                    .map(|v| toml_value(v))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            raw.first()
                .map_or_else(|| "\"\"".to_owned(), |v| toml_value(v))
        };
        out.push_str(&format!("{long} = {value}  # {source}\n"));
    }
    out
}

/// `v` as a TOML value: a number or boolean as it is, anything else quoted.
fn toml_value(v: &str) -> String {
    if v.parse::<i64>().is_ok() || v == "true" || v == "false" {
        return v.to_owned();
    }
    if v.parse::<f64>().is_ok_and(f64::is_finite) && v.contains('.') {
        return v.to_owned();
    }
    toml::Value::String(v.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    #[command(name = "svc")]
    struct Svc {
        #[arg(long, default_value_t = 5)]
        rate: u32,
        #[arg(long, value_delimiter = ',', required = true)]
        peers: Vec<String>,
        #[arg(long)]
        quiet: bool,
        #[arg(long, default_value = "info")]
        log: String,
        #[arg(
            long,
            env = "CHAT_CONFIG_TEST_SECRET_NEVER_SET",
            hide_env_values = true
        )]
        secret: Option<String>,
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), text).expect("write");
        f
    }

    fn argv(f: &tempfile::NamedTempFile, rest: &[&str]) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec!["svc".into(), "--config".into(), f.path().into()];
        v.extend(rest.iter().map(OsString::from));
        v
    }

    #[test]
    fn the_file_supplies_what_flags_do_not_and_flags_win() {
        let f = file(
            "rate = 7\npeers = [\"a:1\", \"b:2\"]\nquiet = true\nsecret = \"s3cret\"\nlog = \"debug\"\n",
        );
        let (svc, matches, cmd, from_file) =
            parse::<Svc>(argv(&f, &["--log", "warn"])).expect("parses");
        assert_eq!(svc.rate, 7);
        assert_eq!(svc.peers, ["a:1", "b:2"]);
        assert!(svc.quiet);
        assert_eq!(svc.log, "warn", "a flag overrides the file");
        assert_eq!(svc.secret.as_deref(), Some("s3cret"));
        let shown = effective(&cmd, &matches, &from_file);
        assert!(shown.contains("rate = 7  # file"), "{shown}");
        assert!(
            shown.contains("peers = [\"a:1\", \"b:2\"]  # file"),
            "{shown}"
        );
        assert!(shown.contains("log = \"warn\"  # flag"), "{shown}");
        assert!(shown.contains("secret = \"(hidden)\"  # file"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn without_a_file_flags_and_defaults_as_before() {
        let (svc, matches, cmd, from_file) =
            parse::<Svc>(vec!["svc".into(), "--peers=x:1".into()]).expect("parses");
        assert_eq!((svc.rate, svc.peers.len(), svc.quiet), (5, 1, false));
        let shown = effective(&cmd, &matches, &from_file);
        assert!(shown.contains("rate = 5  # default"), "{shown}");
        assert!(shown.contains("# secret = (not set)"), "{shown}");
    }

    #[test]
    fn bad_files_are_refused_naming_the_file_and_the_key() {
        let cases = [
            ("peers = [\"a:1\"]\nrat = 7\n", "key `rat`: no such setting"),
            (
                "peers = [\"a:1\"]\nrate = \"lots\"\n",
                "key `rate`: invalid value 'lots'",
            ),
            (
                "peers = [\"a:1\"]\nrate = -1\n",
                "key `rate`: invalid value '-1'",
            ),
            (
                "peers = [\"a:1\"]\nquiet = \"yes\"\n",
                "key `quiet`: a switch",
            ),
            (
                "peers = [\"a:1\"]\nlog = [\"a\", \"b\"]\n",
                "key `log`: takes one value",
            ),
            ("peers = [\"a:1\"\n", "not valid TOML"),
        ];
        for (text, expected) in cases {
            let f = file(text);
            let err = parse::<Svc>(argv(&f, &[])).expect_err(text).to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(err.contains(&f.path().display().to_string()), "{err}");
        }
        let missing = parse::<Svc>(vec!["svc".into(), "--config=/nonexistent/chat.toml".into()])
            .expect_err("no such file")
            .to_string();
        assert!(
            missing.contains("/nonexistent/chat.toml: cannot read it"),
            "{missing}"
        );
    }

    #[test]
    fn a_required_setting_may_come_from_the_file_alone() {
        let f = file("peers = \"a:1,b:2\"\n");
        let (svc, ..) = parse::<Svc>(argv(&f, &[])).expect("the flag's own list form");
        assert_eq!(svc.peers, ["a:1", "b:2"]);
        let f = file("peers = [\"a:1\"]\n");
        assert!(parse::<Svc>(argv(&f, &[])).is_ok());
        assert!(parse::<Svc>(vec!["svc".into()]).is_err(), "still required");
    }
}
