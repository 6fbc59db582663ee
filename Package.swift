// swift-tools-version: 6.1
import PackageDescription

// Layers (docs/ARCHITECTURE.md): each target imports only the ones below it.
//   X86Paging -> GuestMemory -> KVMMMU -> VirtualMachine -> Workloads -> VirtMMUCommands -> virtmmu
let package = Package(
    name: "VirtMMU",
    products: [
        .library(name: "X86Paging", targets: ["X86Paging"]),
        .library(name: "GuestMemory", targets: ["GuestMemory"]),
        .library(name: "KVMMMU", targets: ["KVMMMU"]),
        .library(name: "VirtualMachine", targets: ["VirtualMachine"]),
        .library(name: "Workloads", targets: ["Workloads"]),
        .executable(name: "virtmmu", targets: ["virtmmu"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        .target(name: "X86Paging"),
        .target(name: "GuestMemory", dependencies: ["X86Paging"]),
        .target(name: "KVMMMU", dependencies: ["X86Paging", "GuestMemory"]),
        .target(name: "VirtualMachine", dependencies: ["X86Paging", "GuestMemory", "KVMMMU"]),
        .target(name: "Workloads", dependencies: ["X86Paging", "GuestMemory", "KVMMMU", "VirtualMachine"]),
        .target(
            name: "VirtMMUCommands",
            dependencies: [
                "X86Paging", "GuestMemory", "KVMMMU", "VirtualMachine", "Workloads",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(name: "virtmmu", dependencies: ["VirtMMUCommands"]),
        .testTarget(name: "X86PagingTests", dependencies: ["X86Paging", "GuestMemory"]),
        .testTarget(name: "GuestMemoryTests", dependencies: ["GuestMemory", "X86Paging"]),
        .testTarget(name: "KVMMMUTests", dependencies: ["KVMMMU", "GuestMemory", "X86Paging"]),
        .testTarget(name: "VirtualMachineTests", dependencies: ["VirtualMachine", "Workloads", "KVMMMU", "GuestMemory", "X86Paging"]),
        .testTarget(name: "WorkloadsTests", dependencies: ["Workloads", "VirtualMachine", "KVMMMU", "GuestMemory", "X86Paging"]),
        .testTarget(name: "VirtMMUCommandsTests", dependencies: ["VirtMMUCommands", "Workloads", "KVMMMU", "GuestMemory", "X86Paging"]),
    ]
)
