//! The eBPF object loads, every program attaches to a fresh cgroup (and
//! sk_msg to the SOCKHASH), the kernel reports each, and nothing is left
//! once the datapath is dropped.

use agent::{
    ebpf::{Datapath, Hook, LoadOptions},
    inspect,
};
use tests::{TestCgroup, require_root};

#[test]
fn every_program_attaches_to_a_fresh_cgroup_and_detaches() {
    require_root!();
    let cg = TestCgroup::new();
    assert!(
        inspect::attached(cg.path()).unwrap().is_empty(),
        "fresh cgroup has programs"
    );

    let mut dp =
        Datapath::load(&LoadOptions::default(), None).expect("load and verify every program");
    for hook in Hook::cgroup_hooks() {
        dp.attach_cgroup(hook, cg.path()).unwrap();
    }
    dp.attach_sk_msg().unwrap();

    let attached = inspect::attached(cg.path()).unwrap();
    for hook in Hook::cgroup_hooks() {
        let on_hook: Vec<_> = attached
            .iter()
            .filter(|p| p.hook == hook.program())
            .collect();
        assert_eq!(on_hook.len(), 1, "{hook:?}: {attached:?}");
        assert!(on_hook[0].ours, "{hook:?}: {attached:?}");
    }
    let on_map = dp.attached_to_sockets().unwrap();
    assert!(
        on_map.len() == 1 && on_map[0].ours && on_map[0].hook == Hook::SkMsg.program(),
        "{on_map:?}"
    );
    // Every map the agent names exists in the object, and starts empty.
    assert!(dp.maps().usage().unwrap().iter().all(|m| m.entries == 0));
    assert!(dp.maps().counters().unwrap().iter().all(|(_, v)| v == 0));

    drop(dp);
    assert!(
        inspect::attached(cg.path()).unwrap().is_empty(),
        "left attached"
    );
}
