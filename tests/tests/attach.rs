//! The eBPF object loads, every program attaches to a fresh cgroup (and
//! sk_msg to the SOCKHASH), the kernel reports each, and nothing is left
//! once the datapath is dropped.

use std::fs::File;

use agent::{
    bpf_sys::{attach_type, attached_names},
    ebpf::{Datapath, Hook},
};
use tests::{TestCgroup, require_root};

#[test]
fn every_program_attaches_to_a_fresh_cgroup_and_detaches() {
    require_root!();
    let cg = TestCgroup::new();
    let cg_file = File::open(cg.path()).unwrap();
    let cgroup_hooks = [
        (Hook::Connect4, attach_type::CGROUP_INET4_CONNECT),
        (Hook::GetPeerName4, attach_type::CGROUP_INET4_GETPEERNAME),
        (Hook::SockOps, attach_type::CGROUP_SOCK_OPS),
        (Hook::GetSockopt, attach_type::CGROUP_GETSOCKOPT),
    ];
    for (_, at) in cgroup_hooks {
        assert!(
            attached_names(&cg_file, at).unwrap().is_empty(),
            "fresh cgroup has programs"
        );
    }

    let mut dp = Datapath::load(&agent::ebpf::LoadOptions::default(), None)
        .expect("load and verify every program");
    for (hook, _) in cgroup_hooks {
        dp.attach_cgroup(hook, cg.path()).unwrap();
    }
    dp.attach_sk_msg().unwrap();

    for (hook, at) in cgroup_hooks {
        assert_eq!(
            attached_names(&cg_file, at).unwrap(),
            vec![hook.program().to_owned()],
            "{hook:?}"
        );
    }
    assert_eq!(
        attached_names(dp.sockets_fd(), attach_type::SK_MSG_VERDICT).unwrap(),
        vec![Hook::SkMsg.program().to_owned()]
    );
    // Every map the agent names exists in the object, and starts empty.
    assert!(dp.map_usage().unwrap().iter().all(|m| m.entries == 0));
    assert!(dp.counters().unwrap().iter().all(|&c| c == 0));

    drop(dp);
    for (hook, at) in cgroup_hooks {
        assert!(
            attached_names(&cg_file, at).unwrap().is_empty(),
            "{hook:?} left attached"
        );
    }
}
