import VirtMMUCommands

VirtMMU.main()
