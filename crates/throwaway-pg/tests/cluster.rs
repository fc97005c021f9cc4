//! End-to-end tests against real PostgreSQL servers.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::killpg;
use nix::unistd::Pid;
use throwaway_pg::{Cluster, Error, Options};

/// Whether `pid` is a live process; zombies (killed, not yet reaped by
/// their new parent) count as dead.
fn is_live(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .unwrap_or("X");
    !matches!(state, "Z" | "X" | "x")
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn starts_answers_queries_and_cleans_up() {
    let cluster = Cluster::start().unwrap();
    assert_eq!(cluster.psql("select 1").unwrap(), "1");
    assert_eq!(cluster.host(), "127.0.0.1");
    assert_eq!(cluster.superuser(), "postgres");
    assert_eq!(
        cluster.conn_str(),
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            cluster.port()
        )
    );
    assert!(cluster.is_running());
    assert_eq!(cluster.psql("show fsync").unwrap(), "off");
    assert_eq!(
        cluster.psql("select 1 as a, 'x' as b; select 2").unwrap(),
        "1|x\n2"
    );
    let mode = fs::metadata(cluster.data_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    assert!(cluster.socket_dir().starts_with(cluster.temp_dir()));

    let err = cluster.psql("select * from no_such_table").unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::CommandFailed { .. }), "{text}");
    assert!(text.contains("no_such_table"), "{text}");

    let dir = cluster.temp_dir().to_path_buf();
    let pm = cluster.postmaster_pid().unwrap();
    drop(cluster);
    assert!(!dir.exists());
    assert_eq!(killpg(Pid::from_raw(pm), None), Err(Errno::ESRCH));
}

#[test]
fn parallel_clusters_get_different_ports() {
    let (a, b) = thread::scope(|s| {
        let a = s.spawn(Cluster::start);
        let b = s.spawn(Cluster::start);
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());
    a.psql("create table only_in_a(x int)").unwrap();
    assert_eq!(a.psql("select count(*) from only_in_a").unwrap(), "0");
    assert!(b.psql("select count(*) from only_in_a").is_err());
}

#[test]
fn options_apply_and_survive_stops_and_restarts() {
    let options = Options {
        max_connections: 17,
        data_files: vec![("greeting.txt".into(), b"hello".to_vec())],
        ..Default::default()
    }
    .setting("password_encryption", "md5");
    let mut cluster = Cluster::start_with(options).unwrap();
    let port = cluster.port();
    let check = |c: &Cluster| {
        assert_eq!(c.psql("show max_connections").unwrap(), "17");
        assert_eq!(c.psql("show password_encryption").unwrap(), "md5");
    };
    check(&cluster);
    cluster
        .psql("create table kept(x int); insert into kept values (42)")
        .unwrap();

    cluster.stop_fast().unwrap();
    assert!(!cluster.is_running());
    assert!(cluster.process_ids().is_empty());
    cluster.stop_fast().unwrap();
    cluster.restart().unwrap();
    assert_eq!(cluster.port(), port);
    check(&cluster);

    cluster.stop_immediate().unwrap();
    assert!(!cluster.is_running());
    cluster.restart().unwrap();
    assert_eq!(cluster.port(), port);
    assert_eq!(cluster.psql("select x from kept").unwrap(), "42");

    // Restarting a running server stops it first.
    let before = cluster.postmaster_pid().unwrap();
    cluster.restart().unwrap();
    assert_ne!(cluster.postmaster_pid().unwrap(), before);
    check(&cluster);
}

#[test]
fn standby_streams_and_promotes() {
    let primary = Cluster::start().unwrap();
    primary
        .psql("create table before_backup(x int); insert into before_backup values (1)")
        .unwrap();
    let standby = primary.standby().unwrap();
    assert_ne!(standby.port(), primary.port());
    assert_ne!(standby.data_dir(), primary.data_dir());
    assert_eq!(standby.psql("select pg_is_in_recovery()").unwrap(), "t");
    assert_eq!(
        standby.psql("select count(*) from before_backup").unwrap(),
        "1"
    );

    primary
        .psql("create table streamed(x int); insert into streamed values (1), (2)")
        .unwrap();
    wait_until(
        "the table to reach the standby",
        Duration::from_secs(30),
        || {
            standby
                .psql("select count(*) from streamed")
                .ok()
                .as_deref()
                == Some("2")
        },
    );
    let err = standby.psql("insert into streamed values (3)").unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");

    standby.promote().unwrap();
    assert_eq!(standby.psql("select pg_is_in_recovery()").unwrap(), "f");
    standby.psql("insert into streamed values (3)").unwrap();
    assert_eq!(standby.psql("select count(*) from streamed").unwrap(), "3");
    assert_eq!(primary.psql("select count(*) from streamed").unwrap(), "2");
}

#[test]
fn kill9_orphans_are_cleaned_up_by_restart_and_drop() {
    let mut cluster = Cluster::start().unwrap();
    let first_postmaster = cluster.postmaster_pid().unwrap();

    // A backend busy in a CPU loop never checks whether its postmaster
    // lives, so it outlives a SIGKILLed postmaster.
    let mut client = Command::new(cluster.install().bin("psql"))
        .args([
            "-X",
            "-h",
            cluster.host(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .arg("-p")
        .arg(cluster.port().to_string())
        .args(["-c", "DO $$BEGIN LOOP PERFORM 1; END LOOP; END$$"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut backend = 0;
    wait_until("the looping backend", Duration::from_secs(30), || {
        let out = cluster
            .psql("select pid from pg_stat_activity where query like 'DO $$BEGIN LOOP%'")
            .unwrap();
        backend = out.parse().unwrap_or(0);
        backend != 0
    });

    cluster.kill9_postmaster().unwrap();
    assert!(!cluster.is_running());
    assert_eq!(cluster.postmaster_pid(), None);
    assert!(is_live(backend), "the orphaned backend should still run");
    assert!(cluster.process_ids().contains(&backend));
    assert!(matches!(
        cluster.kill9_postmaster(),
        Err(Error::NotRunning { .. })
    ));

    cluster.restart().unwrap();
    assert_eq!(cluster.psql("select 1").unwrap(), "1");
    assert!(!is_live(backend), "restart should kill the orphan");
    assert_eq!(
        killpg(Pid::from_raw(first_postmaster), None),
        Err(Errno::ESRCH)
    );
    // The client lost its connection when its backend was killed.
    assert!(!client.wait().unwrap().success());

    let postmaster = cluster.postmaster_pid().unwrap();
    let pids = cluster.process_ids();
    assert!(pids.contains(&postmaster));
    assert!(pids.len() > 1, "expected auxiliary processes too: {pids:?}");
    cluster.kill9_postmaster().unwrap();
    let dir = cluster.temp_dir().to_path_buf();
    drop(cluster);
    assert_eq!(killpg(Pid::from_raw(postmaster), None), Err(Errno::ESRCH));
    for pid in pids {
        assert!(!is_live(pid), "process {pid} survived the drop");
    }
    assert!(!dir.exists());
}

#[test]
fn startup_failures_report_the_server_log() {
    let err =
        Cluster::start_with(Options::default().setting("shared_buffers", "lots")).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::ServerExited { .. }), "{text}");
    assert!(text.contains("shared_buffers"), "{text}");

    let err = Cluster::start_with(Options {
        superuser: "no such user".into(),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(err, Error::InvalidOptions(_)), "{err}");
}
