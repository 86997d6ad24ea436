/* boot.S - multiboot entry, flat GDT, SSE on, exception and interrupt stubs. */
#include "vectors.h"

.set MB_MAGIC, 0x1BADB002
.set MB_FLAGS, 0x00000003           /* page-align modules, memory map */

.section .multiboot, "a"
.align 4
.long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

.section .text
.globl _start
_start:
    cli
    mov $stack_top, %esp
    lgdt gdt_desc
    ljmp $0x08, $1f
1:  mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %fs
    mov %ax, %gs
    mov %ax, %ss
    /* MMX for 8-byte MMIO: CR0.EM off, CR0.MP on, FPU initialised. */
    mov %cr0, %eax
    and $~0x4, %eax
    or $0x2, %eax
    mov %eax, %cr0
    fninit
    push %ebx                       /* multiboot info */
    call kmain
2:  hlt
    jmp 2b

/*
 * 8-byte MMIO. MMX movq (0f 6f / 0f 7f) is one 8-byte access, and it is the
 * form KVM's instruction emulator knows (SSE's f3 0f 7e is not), so it works
 * whether an MMIO access is emulated by TCG or by KVM.
 */
.globl mmio_read64
mmio_read64:                        /* u64 mmio_read64(u32 addr) */
    mov 4(%esp), %ecx
    sub $8, %esp
    movq (%ecx), %mm0
    movq %mm0, (%esp)
    emms
    mov (%esp), %eax
    mov 4(%esp), %edx
    add $8, %esp
    ret

.globl mmio_write64
mmio_write64:                       /* void mmio_write64(u32 addr, u64 value) */
    mov 4(%esp), %ecx
    movq 8(%esp), %mm0
    movq %mm0, (%ecx)
    emms
    ret

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

/* Device interrupts (vector >= 32) share one stub that passes the vector along. */
.macro IRQ n
.globl vector\n
vector\n:
    push $0
    push $\n
    jmp irq_entry
.endm
IRQ VEC_PIC_BASE_0
IRQ VEC_PIC_BASE_7
IRQ VEC_PIC_BASE_15
IRQ VEC_KICK
IRQ VEC_SPURIOUS
IRQ VEC_UNEXPECTED

trap_entry:                         /* never returns: an exception is a crash */
    pusha
    push %esp
    call trap
1:  cli
    hlt
    jmp 1b

irq_entry:
    pusha
    push %esp
    call irq
    add $4, %esp
    popa
    add $8, %esp
    iret

.section .rodata
.align 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff        /* 0x08: flat 32-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: flat data */
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt

.section .bss
.align 16
stack:
    .skip 16384
.globl stack_top
stack_top:
