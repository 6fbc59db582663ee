// VirtualMachine: the VM, its vCPUs, the host hardware walker and TLB over SPTEs, exits, and the lockstep reference machine.
