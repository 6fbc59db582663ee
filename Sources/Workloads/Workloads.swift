// Workloads: scenarios, the guest-kernel model, built-in workloads.
