// KVMMMU: what KVM decides — roles, SPTEs, the shadow and TDP MMUs, nested MMUs, SPP, stats.
//
// Files so far:
//   PageRole.swift         union kvm_mmu_page_role / kvm_mmu_extended_role / kvm_cpu_role, ACC bits
//   RoleComputation.swift  kvm_calc_cpu_role, root roles per MMU flavour, kvm_mmu_child_role, PAE root
//                          quadrants, what CR0/CR4/EFER writes do to the MMU context
//   SPTE.swift             the SPTE formats (x86 and EPT, chosen at run time by SPTEMasks), predicates
//                          and constructors from spte.h / spte.c
//   MMUStats.swift         KVM's MMU statistics under KVM's names
//   MMUEvents.swift        KVM's kvmmmu tracepoints as events, and a bounded event log
//   SPP.swift              sub-page write protection: per-memslot bitmaps, the SPP table KVM builds,
//                          the `spp` role bit, SPTE arming, the fault path's and emulator's checks
