//! Configuration files, through the real binaries: a file's settings under
//! the environment's and the flags', `--print-config`, and bad files
//! refused naming the file and the key before the service does anything.

use std::process::{Command, Output};

fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
    let out = Command::new(chat_tests::binary(bin)?)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()?;
    Ok(out)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_gateway_takes_the_file_under_the_environment_and_flags() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        r#"
routers = ["router-1:7101", "router-2:7101"]
token-key = "s3cret-0123456789abcdef"
max-queue-ms = 111
user_rate = 7
lease-ms = 999
no-overload-protection = true
"#,
    )?;
    let path = file.to_str().expect("utf-8 path");
    let out = run(
        "chat-gateway",
        &["--config", path, "--lease-ms", "1234", "--print-config"],
        &[("CHAT_GATEWAY_USER_RATE", "8")],
    )?;
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}{}", text(&out.stderr));
    for line in [
        "routers = [\"router-1:7101\", \"router-2:7101\"]  # file",
        "max-queue-ms = 111  # file",
        "user-rate = 8  # environment",
        "lease-ms = 1234  # flag",
        "no-overload-protection = true  # file",
        "sweep-ms = 2000  # default",
        "token-key = \"(hidden)\"  # file",
    ] {
        assert!(shown.contains(line), "no `{line}` in:\n{shown}");
    }
    assert!(!shown.contains("s3cret"), "a secret printed:\n{shown}");
    Ok(())
}

#[test]
fn a_bad_file_stops_the_service_before_it_starts_naming_the_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let cases = [
        (
            "chat-store",
            format!(
                "id = 1\nlisten = \"127.0.0.1:0\"\npeers = \"1=127.0.0.1:1\"\ndata-dir = {:?}\ntick_msec = 50\n",
                data.display().to_string()
            ),
            "key `tick_msec`: no such setting",
        ),
        (
            "chat-store",
            format!(
                "id = 1\nlisten = \"127.0.0.1:0\"\npeers = \"1=127.0.0.1:1\"\ndata-dir = {:?}\ntick-ms = \"fast\"\n",
                data.display().to_string()
            ),
            "key `tick-ms`: invalid value 'fast'",
        ),
        (
            "chat-router",
            "worker-threads = \"many\"\n".to_owned(),
            "key `worker-threads`: invalid value 'many'",
        ),
        (
            "chat-gateway",
            "routers = [\"r:1\"]\nlisten = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n".to_owned(),
            "key `listen`: takes one value",
        ),
    ];
    for (bin, content, expected) in cases {
        let file = dir.path().join(format!("{bin}.toml"));
        std::fs::write(&file, &content)?;
        let path = file.to_str().expect("utf-8 path");
        let out = run(bin, &["--config", path], &[])?;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bin} {content}: {err}");
        assert!(err.contains(expected), "{bin}: no `{expected}` in: {err}");
        assert!(err.contains(path), "{bin}: the file is not named: {err}");
        assert!(!data.exists(), "{bin} opened its data before refusing");
    }
    // CHAT_CONFIG names the file too.
    let file = dir.path().join("router.toml");
    std::fs::write(&file, "no-such-setting = 1\n")?;
    let out = run(
        "chat-router",
        &[],
        &[("CHAT_CONFIG", file.to_str().expect("utf-8 path"))],
    )?;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("key `no-such-setting`"));
    Ok(())
}
