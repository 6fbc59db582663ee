// Realistic scenario files, inline (the test target has no resources).

enum ExampleScenarios {
    /// A small 4-level guest: a kernel text page, a user stack, a 2 MiB kernel data page, a 1 GiB direct
    /// map; SMEP and SMAP switched on mid-way; the guest then unmaps and remaps a page table entry.
    static let smepSmapTour = """
        # smep-smap-tour.scn: what SMEP, SMAP and RFLAGS.AC do to supervisor accesses.
        # Memory and CPU first: nothing may change them once the guest runs.
        mem 128M
        cpu maxphyaddr=46 gbpages=1 la57=0

        set wp=1 nx=1 smep=0 smap=0 pke=0 ac=0      # the issue's defaults, spelled out

        # Kernel text: global, read-only, executable. User pages: US set.
        map 0xffffffff81000000 0x0100_0000 2m P|G|A           # kernel text (2 MiB)
        map 0xffff888000000000 0x0 1g P,RW,A,D,G,NX           # direct map of the first GiB
        map 0x0000000000400000 0x0200_0000 4k P,US,A          # user text
        map 0x00007ffffffff000 0x0300_0000 4k P,RW,US,NX l2=P,RW,US l3=P,RW,US l4=P,RW,US   # user stack
        map 0x0000000000600000 0x0400_0000 4k P,RW,US pkey=3  # a protection-keyed user page

        access exec  0xffffffff81000000                       # kernel fetches its own text
        access read  0x400000 cpl=3
        access write 0x7ffffffff000 cpl=3 value=0x1122334455667788
        access exec  0x400000 cpl=0                           # allowed until SMEP is on

        set smep=1 smap=1
        access exec  0x400000 cpl=0                           # SMEP: #PF, I/D|P
        access read  0x7ffffffff000                           # SMAP: #PF, P
        set ac=1
        access read  0x7ffffffff000                           # AC lifts SMAP for explicit accesses
        set ac=0

        set pke=1 pkru=0x80                                   # key 3: write-disable
        access write 0x600000 cpl=3 value=42                  # #PF with PK

        # The guest makes its user text writable, then non-present, and flushes.
        pte 0x400000 1 P,RW,US,A
        invlpg 0x400000
        access write 0x400000 cpl=3 value=0x90
        pte 0x400000 1 raw=0x0
        reload-cr3
        access read 0x400000 cpl=3                            # #PF, not present
        access read 0x0000800000000000                        # non-canonical: #GP
        """

    /// A PAE guest: 2 MiB pages, NX in PAE, PDPTE rewrites.
    static let paeGuest = """
        mem 32M
        set paging=pae
        map 0xc0000000 0x00000000 2m P,RW,A,D          # kernel
        map 0x08048000 0x00800000 4k P,US l2=P,RW,US    # user text
        map 0xbfff0000 0x00900000 4k P,RW,US,NX
        access read 0x08048000 cpl=3
        access exec 0xbfff0000 cpl=3                    # NX: #PF
        pte 0x08048000 3 raw=0x1                        # PDPTE rewritten (no tables below)
        reload-cr3
        access read 0x08048000 cpl=3
        """

    /// 32-bit paging with a 4 MiB page above 4 GiB (PSE-36), and 5-level paging.
    static let legacyGuest = """
        cpu maxphyaddr=40
        set paging=32 nx=0
        map 0xc0000000 0x1_0000_0000 4m P,RW,G
        map 0x00001000 0x00002000 4k P,RW,US
        access write 0x1000 cpl=3 value=0xffffffff
        pte 0x1000 2 raw=0xffffffff
        """

    static let fiveLevelGuest = """
        set la57=1
        map 0xff11000000000000 0x0 1g P,RW l5=P,RW l4=P,RW
        access read 0xff11000000000000
        pte 0xff11000000000000 5 0
        invlpg 0xff11000000000000
        """

    static let all = [smepSmapTour, paeGuest, legacyGuest, fiveLevelGuest]
}
