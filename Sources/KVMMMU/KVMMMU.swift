// KVMMMU: what KVM decides — roles, SPTEs, the shadow and TDP MMUs, nested MMUs, SPP, stats.
