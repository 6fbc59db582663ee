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
//   SPTESlot.swift         atomic access to one SPTE (load, compare-and-exchange, exchange, bit ops)
//   MMULock.swift          kvm->mmu_lock: a readers-writer lock
//   HugePages.swift        lpage_info, gfn write tracking, the host's mapping size: where a gfn may map huge
//   TDPPageTables.swift    the TDP MMU's flat per-table records (gfn, role, parent SPTE, NX list links)
//   TDPIterator.swift      tdp_iter: the pre-order walk over a root's SPTEs
//   TDPMMU.swift           the TDP MMU: configuration, roots, counters, locking and deferred freeing
//   TDPMMU+SPTE.swift      setting SPTEs atomically, handle_changed_spte, handle_removed_pt, splitting
//   TDPMMU+Fault.swift     the TDP page fault: MMIO fast path, fast page fault, huge-page adjust, map
//   TDPMMU+Zap.swift       zapping leaves, roots, one table; root invalidation; NX huge-page recovery
//   TDPMMU+DirtyLog.swift  write protection, D-bit clearing, GET/CLEAR_DIRTY_LOG, eager splitting,
//                          recovering huge pages
//   TDPMMU+Memslots.swift  memslot create/delete/flags, write tracking, aging
//   TDPMMU+Audit.swift     the TDP MMU's structural auditor
