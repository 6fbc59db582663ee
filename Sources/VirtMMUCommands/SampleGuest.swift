import GuestMemory
import X86Paging

/// The built-in sample guest: a small 64-bit Linux-like address space with one of everything the
/// walker explains (kernel direct map on 2 MiB pages, a 1 GiB page, user code/data/stack, a
/// read-only page, a protection-keyed page, a not-present PTE and a PTE with a reserved bit).
public enum SampleGuest {
    public static let directMapBase: UInt64 = 0xffff_8880_0000_0000
    public static let kernelTextBase: UInt64 = 0xffff_ffff_8100_0000
    public static let gigabyteAliasBase: UInt64 = 0xffff_c900_0000_0000
    public static let userCode: UInt64 = 0x40_0000
    public static let userData: UInt64 = 0x60_0000
    public static let userReadOnly: UInt64 = 0x60_4000
    public static let userKeyed: UInt64 = 0x60_5000
    public static let userNotPresent: UInt64 = 0x80_0000
    public static let userReservedBit: UInt64 = 0x80_1000
    public static let userStack: UInt64 = 0x7fff_ffff_d000
    /// The protection key of `userKeyed`; the sample's PKRU denies all data access with it.
    public static let protectionKey = 1

    public static let memorySize: UInt64 = 64 << 20
    static let tableArea: UInt64 = 0x3f0_0000

    /// CR0.PE|WP|PG; CR4.PAE|PGE|SMEP|SMAP|PKE; EFER.SCE|LME|LMA|NXE; PKRU.AD for key 1.
    public static func registers(cr3: UInt64) -> PagingRegisters {
        PagingRegisters(cr0: [.protectionEnable, .writeProtect, .paging], cr3: cr3,
                        cr4: [.physicalAddressExtension, .globalPages, .smep, .smap, .protectionKeys],
                        efer: [.syscallEnable, .longModeEnable, .longModeActive, .noExecuteEnable],
                        pkru: PKRU(1 << UInt32(2 * protectionKey)))
    }

    public static func make() throws -> (memory: GuestPhysicalMemory, registers: PagingRegisters) {
        let memory = GuestPhysicalMemory()
        try memory.back(GuestPhysicalAddress(0), size: memorySize)
        let tables = try PageTableBuilder(memory: memory, format: .fourLevel, tableArea: GuestPhysicalAddress(tableArea),
                                          tableAreaSize: 1 << 20)
        let present: UInt64 = 1, writable: UInt64 = 1 << 1, user: UInt64 = 1 << 2
        let accessed: UInt64 = 1 << 5, dirty: UInt64 = 1 << 6, global: UInt64 = 1 << 8, noExecute: UInt64 = 1 << 63
        let twoMiB: UInt64 = 2 << 20
        // Kernel direct map of all guest memory: supervisor, writable, not executable.
        for offset in stride(from: 0, to: memorySize, by: Int(twoMiB)) {
            try tables.map(directMapBase + UInt64(offset), to: UInt64(offset), size: twoMiB,
                           leafFlags: present | writable | accessed | dirty | global | noExecute,
                           tableFlags: present | writable)
        }
        // Kernel text: supervisor, read-only, executable.
        for offset in stride(from: 0, to: 16 << 20, by: Int(twoMiB)) {
            try tables.map(kernelTextBase + UInt64(offset), to: 0x100_0000 + UInt64(offset), size: twoMiB,
                           leafFlags: present | accessed | global, tableFlags: present | writable)
        }
        try tables.map(gigabyteAliasBase, to: 0, size: 1 << 30, leafFlags: present | writable | global | noExecute,
                       tableFlags: present | writable)
        // A user process.
        let userTables = present | writable | user
        for page in 0..<4 {
            try tables.map(userCode + UInt64(page) * pageSize, to: 0x200_0000 + UInt64(page) * pageSize,
                           leafFlags: present | user | accessed, tableFlags: userTables)
        }
        for page in 0..<4 {
            try tables.map(userData + UInt64(page) * pageSize, to: 0x201_0000 + UInt64(page) * pageSize,
                           leafFlags: present | writable | user | noExecute, tableFlags: userTables)
        }
        try tables.map(userReadOnly, to: 0x202_0000, leafFlags: present | user | noExecute, tableFlags: userTables)
        try tables.map(userKeyed, to: 0x202_1000, leafFlags: present | writable | user | noExecute
                       | UInt64(protectionKey) << 59, tableFlags: userTables)
        try tables.map(userStack, to: 0x203_0000, leafFlags: present | writable | user | noExecute | accessed | dirty,
                       tableFlags: userTables)
        try tables.map(userStack + pageSize, to: 0x203_1000, leafFlags: present | writable | user | noExecute,
                       tableFlags: userTables)
        // A PTE the kernel has cleared (swapped out), and one with bit 51 set (reserved with MAXPHYADDR 46).
        try tables.setEntry(userNotPresent, level: 1, value: 0x204_0000 | writable | user)
        try tables.setEntry(userReservedBit, level: 1, value: 0x204_1000 | present | writable | user | 1 << 51)
        // Something recognisable in the user code page.
        try memory.write(GuestPhysicalAddress(0x200_0000), bytes: Array("VirtMMU sample guest".utf8))
        return (memory, registers(cr3: tables.root.rawValue))
    }

    /// The walks the default report explains, each with what it demonstrates.
    public static let demonstrations: [(address: UInt64, access: Access, alignmentCheck: Bool, title: String)] = [
        (userCode + 0x123, .read(.user), false, "user reads its code"),
        (userCode + 0x10, .write(.user), false, "user writes its read-only code"),
        (userData + 0x40, .fetch(.user), false, "user jumps into its non-executable data"),
        (userData + 0x40, .read(.supervisor), false, "kernel reads user data with SMAP on and RFLAGS.AC=0"),
        (userData + 0x40, .read(.supervisor), true, "kernel reads user data under STAC (RFLAGS.AC=1)"),
        (userData + 0x40, .read(.implicitSupervisor), true, "implicit supervisor read of user data (AC cannot help)"),
        (userCode, .fetch(.supervisor), false, "kernel executes user code with SMEP on"),
        (userKeyed, .read(.user), false, "user reads a page whose protection key PKRU denies"),
        (directMapBase + 0x1234, .read(.user), false, "user reads the kernel direct map"),
        (directMapBase + 0x20_0000, .write(.supervisor), false, "kernel writes through the direct map (2 MiB page)"),
        (kernelTextBase + 0x100, .write(.supervisor), false, "kernel writes its read-only text with CR0.WP=1"),
        (gigabyteAliasBase + 0x1234_5678, .read(.supervisor), false, "kernel reads through a 1 GiB page"),
        (userNotPresent, .read(.user), false, "user touches a swapped-out page"),
        (userReservedBit, .read(.user), false, "a PTE with a reserved physical-address bit"),
        (0x0000_8000_0000_0000, .read(.user), false, "a non-canonical address"),
    ]
}
