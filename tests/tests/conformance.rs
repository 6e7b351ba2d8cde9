//! Conformance: turning eBPF mode on changes nothing an application can
//! observe compared with iptables mode, only its speed. Real clients
//! (Python, Rust `std::net`, Java, Go, Node.js, curl, wget) and blocking
//! Rust servers, through the built-in proxy, HAProxy and a blocking
//! thread-per-direction proxy, outbound and inbound; one expectation per
//! cell, the same in both modes (what plain TCP gives).
//!
//! One test per (client, scenario, direction, proxy), running both modes
//! and printing a `CONFORMANCE` line per mode (see `tests::conformance`);
//! the scenarios a client cannot express are `n/a`, listed by the table
//! below. `cargo xtask conformance` runs this binary alone and prints the
//! table.

use rstest::rstest;
use tests::conformance::{Cell, Client, Direction, Known, Proxy, Scenario, TestFn};

/// The table: for each test function, its proxy, its client and the
/// scenarios it runs (each outbound and inbound). Every other scenario of
/// that client and proxy is `n/a`.
macro_rules! conformance {
    ($($test:ident: $proxy:ident $client:ident [$($scenario:ident),+ $(,)?];)+) => {
        const TESTS: &[TestFn] = &[$(TestFn {
            name: stringify!($test),
            proxy: Proxy::$proxy,
            client: Client::$client,
            scenarios: &[$(Scenario::$scenario),+],
        }),+];

        $(
            #[rstest]
            fn $test(
                #[values($(Scenario::$scenario),+)] scenario: Scenario,
                #[values(Direction::Outbound, Direction::Inbound)] direction: Direction,
            ) {
                run(Cell {
                    client: Client::$client,
                    scenario,
                    direction,
                    proxy: Proxy::$proxy,
                });
            }
        )+
    };
}

conformance! {
    conformance_builtin_python_socket: Builtin PySocket
        [Small, Download, Upload, HalfClose, RstBlocked, RstMid, SlowReader];
    conformance_builtin_python_socket_threads: Builtin PyThreads
        [Small, Download, Upload, Duplex, HalfClose, RstBlocked, RstMid, SlowReader];
    conformance_builtin_python_http_client: Builtin PyHttpClient
        [Small, Download, Upload, RstBlocked, RstMid, SlowReader];
    conformance_builtin_python_urllib: Builtin PyUrllib
        [Small, Download, Upload, RstBlocked, RstMid, SlowReader];
    conformance_builtin_python_asyncio: Builtin PyAsyncio
        [Small, Download, Upload, Duplex, HalfClose, RstBlocked, RstMid, SlowReader];
    conformance_builtin_rust_read_to_end: Builtin RustReadToEnd
        [Small, Download, Upload, Duplex, HalfClose, RstBlocked, RstMid];
    conformance_builtin_rust_lines: Builtin RustLines
        [Small, Download, RstBlocked, RstMid, SlowReader];
    conformance_builtin_java_socket_threads: Builtin JavaSocket
        [Small, Download, Upload, Duplex, HalfClose, RstBlocked, RstMid, SlowReader];
    conformance_builtin_java_http_url_connection: Builtin JavaUrlConnection
        [Small, Download, Upload, RstBlocked, RstMid, SlowReader];
    conformance_builtin_java_http_client: Builtin JavaHttpClient
        [Small, Download, Upload, RstBlocked, RstMid, SlowReader];
    conformance_builtin_go_net_http: Builtin GoNetHttp
        [Small, Download, Upload, RstBlocked, RstMid, SlowReader];
    conformance_builtin_node_http: Builtin NodeHttp
        [Small, Download, Upload, RstBlocked, RstMid, SlowReader];
    conformance_builtin_curl: Builtin Curl
        [Small, Download, Upload, RstBlocked, RstMid, SlowReader, Download256mLimited];
    conformance_builtin_wget: Builtin Wget
        [Small, Download, Upload, RstBlocked, RstMid, SlowReader];

    conformance_haproxy_curl: Haproxy Curl
        [Small, Download, Upload, RstBlocked, RstMid, Download256mLimited];
    conformance_haproxy_python_socket: Haproxy PySocket
        [Small, Download, Upload, HalfClose, RstBlocked, RstMid];
    conformance_haproxy_python_socket_threads: Haproxy PyThreads
        [Small, Download, Upload, Duplex, HalfClose, RstBlocked, RstMid];

    conformance_blocking_proxy_curl: BlockingPy Curl
        [Small, Download, Upload, RstBlocked, RstMid, Download256mLimited];
    conformance_blocking_proxy_python_socket: BlockingPy PySocket
        [Small, Download, Upload, HalfClose, RstBlocked, RstMid];
    conformance_blocking_proxy_python_socket_threads: BlockingPy PyThreads
        [Small, Download, Upload, Duplex, HalfClose, RstBlocked, RstMid];
}

/// The reproductions the table must show by name: they fail in eBPF mode
/// on kernels whose `tcp_bpf_recvmsg` wakes a blocked reader with EAGAIN
/// (see README, "Kernel behaviour under the short-circuit").
const KNOWN: &[Known] = &[
    Known {
        tag: "(a)",
        cell: Cell {
            client: Client::PyThreads,
            scenario: Scenario::Duplex,
            direction: Direction::Outbound,
            proxy: Proxy::Builtin,
        },
        what: "one thread blocked in recv() while another sendall()s 32 MiB to an echo server",
    },
    Known {
        tag: "(b)",
        cell: Cell {
            client: Client::Curl,
            scenario: Scenario::Download256mLimited,
            direction: Direction::Outbound,
            proxy: Proxy::BlockingPy,
        },
        what: "a blocking thread-per-direction proxy, curl --limit-rate 100M downloading 256 MiB",
    },
    Known {
        tag: "(c)",
        cell: Cell {
            client: Client::PySocket,
            scenario: Scenario::RstBlocked,
            direction: Direction::Outbound,
            proxy: Proxy::Builtin,
        },
        what: "a blocking read asleep when the upstream resets must get ECONNRESET",
    },
];

fn run(cell: Cell) {
    tests::require_root!();
    if let Some(why) = tests::conformance::unavailable(cell) {
        if let Some(by_design) = tests::conformance::lacking_by_design(cell) {
            // Not a skip: the guest is built without it (`cargo xtask vm-test`).
            tests::conformance::report(cell, &format!("n/a ({by_design})"));
            eprintln!("SKIPPED: {cell}: {by_design}: {why}");
            return;
        }
        tests::conformance::report(cell, &format!("skipped: {why}"));
        tests::skip!("{cell}: {why}");
    }
    tests::conformance::check(cell, TESTS, KNOWN);
}

/// The judge itself: each way a cell can differ is a difference (these
/// need no root, and show the suite's cells can fail).
mod judge {
    use std::net::{IpAddr, Ipv4Addr};

    use tests::conformance::{
        Cell, Client, Direction, End, Observation, Proxy, Scenario, judge, upstream::Record,
    };

    const WANT: u64 = 1000;

    fn cell(scenario: Scenario, direction: Direction, proxy: Proxy) -> Cell {
        Cell {
            client: Client::PySocket,
            scenario,
            direction,
            proxy,
        }
    }

    fn seen(end: End, bytes: u64, detail: &str) -> Observation {
        Observation {
            end,
            bytes,
            exact: true,
            detail: detail.into(),
        }
    }

    fn inbound_record() -> Record {
        Record {
            peers: vec![tests::conformance::upstream::PASSTHROUGH],
            ..Record::default()
        }
    }

    #[test]
    fn judge_complete_needs_every_byte_and_a_clean_end() {
        let c = cell(Scenario::Download, Direction::Outbound, Proxy::Builtin);
        let r = Record::default();
        assert_eq!(judge(c, &seen(End::Ok, WANT, "-"), WANT, &r), Ok(()));
        let short = judge(c, &seen(End::Ok, WANT - 1, "-"), WANT, &r).unwrap_err();
        assert!(short.contains("999 bytes"), "{short}");
        let differ = Observation {
            exact: false,
            ..seen(End::Ok, WANT, "-")
        };
        assert!(judge(c, &differ, WANT, &r).unwrap_err().contains("differ"));
        let eof = judge(c, &seen(End::Eof, 10, "recv"), WANT, &r).unwrap_err();
        assert!(eof.contains("truncated at 10"), "{eof}");
        let eagain = judge(c, &seen(End::Eagain, 10, "recv: BlockingIOError"), WANT, &r);
        assert_eq!(
            eagain.unwrap_err(),
            "EAGAIN on a blocking recv at 10 of 1000"
        );
        let hung = judge(
            c,
            &Observation::hung(std::time::Duration::from_secs(5), "x"),
            WANT,
            &r,
        );
        assert!(hung.unwrap_err().starts_with("hung"));
    }

    #[test]
    fn judge_reset_is_econnreset_and_nothing_else() {
        let c = cell(Scenario::RstBlocked, Direction::Outbound, Proxy::Builtin);
        let r = Record::default();
        assert_eq!(judge(c, &seen(End::Reset, 0, "recv"), 0, &r), Ok(()));
        for end in [End::Ok, End::Eof, End::Eagain, End::Error] {
            assert!(judge(c, &seen(end, 0, "recv"), 0, &r).is_err(), "{end:?}");
        }
        // Through HAProxy, a reset ends as a close with iptables as well.
        let h = cell(Scenario::RstMid, Direction::Outbound, Proxy::Haproxy);
        assert_eq!(judge(h, &seen(End::Eof, 5, "recv"), 0, &r), Ok(()));
        for end in [End::Ok, End::Reset, End::Eagain, End::Error] {
            assert!(judge(h, &seen(end, 0, "recv"), 0, &r).is_err(), "{end:?}");
        }
    }

    #[test]
    fn judge_counts_what_the_server_saw() {
        let up = cell(Scenario::Upload, Direction::Inbound, Proxy::Builtin);
        let sent = Scenario::Upload.size() as u64;
        let ok = seen(End::Ok, WANT, "-");
        let full = Record {
            received: sent,
            ..inbound_record()
        };
        assert_eq!(judge(up, &ok, WANT, &full), Ok(()));
        let short = Record {
            received: sent - 1,
            ..inbound_record()
        };
        assert!(judge(up, &ok, WANT, &short).is_err());
        let mismatch = Record {
            mismatch_at: Some(7),
            ..full.clone()
        };
        assert!(
            judge(up, &ok, WANT, &mismatch)
                .unwrap_err()
                .contains("at 7")
        );
        let eagain = Record {
            eagain: vec!["read".into()],
            ..full.clone()
        };
        assert!(
            judge(up, &ok, WANT, &eagain)
                .unwrap_err()
                .contains("EAGAIN")
        );
        let direct = Record {
            peers: vec![IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2))],
            ..full
        };
        assert!(
            judge(up, &ok, WANT, &direct)
                .unwrap_err()
                .contains("not through the proxy")
        );
    }
}
