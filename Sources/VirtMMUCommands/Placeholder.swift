import X86Paging
