/// Scenarios that ship inside the command, so that `virtmmu run` shows something on a fresh
/// machine without a file.
public enum BuiltInScenario {
    /// A tour of KVM's shadow MMU: the first fault building the shadow path, protect_clean_gpte,
    /// prefetch, guest faults with their error codes, the guest rewriting its own (write-protected)
    /// tables, a huge page shadowed by 4 KiB direct pages, write flooding, INVLPG and CR3 loads.
    public static let tourName = "<built-in tour>"
    public static let tour = """
    # The built-in tour (virtmmu run with no file). Guest RAM above 16 MiB; the guest kernel keeps
    # its page tables below 16 MiB and rewrites them through its window, as an OS does.
    mem 128M
    set wp=1 nx=1 smep=1 smap=1 ac=0

    map 0x400000 0x1000000 4k P,RW,US,A           # user data: A set, D clear
    map 0x401000 0x1001000 4k P,RW,US,A           # its neighbours, prefetched on the first fault
    map 0x402000 0x1002000 4k P,RW,US,A,D
    map 0x403000 0x1003000 4k P,US                # read-only, not yet accessed: never prefetched
    map 0x600000 0x1200000 2m P,RW,US             # a 2 MiB page: direct shadow pages below it
    map 0xffffffff81000000 0x1400000 4k P,RW,G    # kernel data

    access read  0x400000 cpl=3                   # the first fault builds the shadow path
    access write 0x400010 cpl=3 value=0x1234      # D was clear: mapped read-only, so fault again
    access read  0x402000 cpl=3                   # prefetched with the first fault: no exit
    access write 0x403000 cpl=3 value=1           # #PF 0x7: read-only page
    access exec  0x400000 cpl=0                   # #PF 0x11: SMEP
    access read  0x400000 cpl=0                   # #PF 0x1: SMAP (RFLAGS.AC=0)
    access read  0xffffffff81000000 cpl=3         # #PF 0x5: supervisor page
    access write 0x7ff000 cpl=3 value=0x2222      # the last 4 KiB of the 2 MiB page
    access write 0xffffffff81000008 value=0x99

    pte 0x400000 1 P,US,A,D                       # the guest makes its page read-only: emulated
    access write 0x400000 cpl=3 value=5           # #PF 0x7: the SPTE followed the guest's PTE
    pte 0x400000 1 P,RW,US,A,D                    # and writable again
    invlpg 0x400000
    access write 0x400000 cpl=3 value=6

    pte 0x600000 2 P,US,PS                        # three writes to the page directory without a
    pte 0x600000 2 P,RW,US,PS                     # walk through it in between: KVM decides the
    pte 0x600000 2 P,US,PS                        # table is no longer one and zaps it (flooding)
    invlpg 0x600000
    access read  0x600000 cpl=3                   # reshadowed
    access write 0x600000 cpl=3 value=1           # #PF 0x7

    reload-cr3                                    # the TLB goes, the shadow pages stay
    access read  0x400000 cpl=3
    """
}
