/*
 * boot.S - multiboot entry, the switch to 64-bit long mode, and the
 * exception and interrupt stubs.
 *
 * Long mode gives single 8-byte MMIO accesses with a plain mov (which
 * every instruction emulator knows) and room to map BARs anywhere later.
 */
#include "vectors.h"

.set MB_MAGIC, 0x1BADB002
.set MB_FLAGS, 0x00000003           /* page-align modules, memory map */

.section .multiboot, "a"
.align 4
.long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

.section .text
.code32
.globl _start
_start:
    cli
    mov $stack_top, %esp
    /* Identity-map the low 4 GiB with 2 MiB pages: PML4[0] -> PDPT[0..3] -> pd[0..2047]. */
    mov $pdpt + 3, %eax
    mov %eax, pml4
    mov $pd + 3, %eax
    mov $pdpt, %edx
    mov $4, %ecx
1:  mov %eax, (%edx)
    add $4096, %eax
    add $8, %edx
    loop 1b
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax                  /* present, writable, 2 MiB */
    mov %eax, pd(, %ecx, 8)
    inc %ecx
    cmp $2048, %ecx
    jne 2b
    mov %cr4, %eax
    or $0x20, %eax                  /* PAE */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx           /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax            /* paging and protection */
    mov %eax, %cr0
    lgdt gdt_desc
    ljmp $0x08, $long_mode

.code64
long_mode:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %fs
    mov %ax, %gs
    mov %ax, %ss
    mov $stack_top, %rsp
    call kmain
3:  hlt
    jmp 3b

/* Exception stubs: push a zero where the CPU pushes no error code, then the vector. */
.macro EXC_NOERR n
.globl vector\n
vector\n:
    push $0
    push $\n
    jmp trap_entry
.endm
.macro EXC_ERR n
.globl vector\n
vector\n:
    push $\n
    jmp trap_entry
.endm

EXC_NOERR 0
EXC_NOERR 1
EXC_NOERR 2
EXC_NOERR 3
EXC_NOERR 4
EXC_NOERR 5
EXC_NOERR 6
EXC_NOERR 7
EXC_ERR   8
EXC_NOERR 9
EXC_ERR   10
EXC_ERR   11
EXC_ERR   12
EXC_ERR   13
EXC_ERR   14
EXC_NOERR 15
EXC_NOERR 16
EXC_ERR   17
EXC_NOERR 18
EXC_NOERR 19
EXC_NOERR 20
EXC_ERR   21
EXC_NOERR 22
EXC_NOERR 23
EXC_NOERR 24
EXC_NOERR 25
EXC_NOERR 26
EXC_NOERR 27
EXC_NOERR 28
EXC_ERR   29
EXC_ERR   30
EXC_NOERR 31

/*
 * Device interrupts: one stub per vector from 32 to 255, IRQ_STUB_SIZE bytes
 * apart, each pushing a zero error code and its vector.
 */
.align IRQ_STUB_SIZE
.globl irq_stubs
irq_stubs:
.set vec, 32
.rept 224
    .align IRQ_STUB_SIZE
    push $0
    push $vec
    jmp irq_entry
.set vec, vec + 1
.endr
.align IRQ_STUB_SIZE
.globl irq_stubs_end
irq_stubs_end:                      /* link.ld checks that no stub outgrew its slot */

/* Save every general register in struct trapframe order (kernel.h). */
.macro SAVE_REGS
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
.endm

trap_entry:                         /* an exception is a crash: trap() returns only for an interrupt */
    SAVE_REGS                       /* that a device sent on an exception's vector (a forged MSI) */
    mov %rsp, %rdi
    call trap
    jmp restore

.section .text.irq, "ax"             /* the interrupt path's page (link.ld) */
irq_entry:
    SAVE_REGS
    mov %rsp, %rdi                  /* 176 bytes pushed since the CPU aligned rsp: still aligned */
    call irq
restore:
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq

.section .rodata
.align 8
gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: flat data */
gdt_desc:
    .word gdt_desc - gdt - 1
    .quad gdt

.section .bss
.align 4096
pml4:
    .skip 4096
.globl pdpt                             /* kernel.c maps page aliases through its entry 4 */
pdpt:
    .skip 4096
pd:
    .skip 4 * 4096
stack:
    .skip 16384
.globl stack_top
stack_top:
