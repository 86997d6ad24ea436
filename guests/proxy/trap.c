/* trap.c - IDT, interrupt controllers, and CPU exceptions turned into crash records. */
#include "kernel.h"
#include "vectors.h"

struct idt_gate {
    u16 offset_lo, selector;
    u8 ist, type_attr;
    u16 offset_mid;
    u32 offset_hi, reserved;
} __attribute__((packed));

static struct idt_gate idt[256];

extern void vector0(void), vector1(void), vector2(void), vector3(void), vector4(void),
    vector5(void), vector6(void), vector7(void), vector8(void), vector9(void),
    vector10(void), vector11(void), vector12(void), vector13(void), vector14(void),
    vector15(void), vector16(void), vector17(void), vector18(void), vector19(void),
    vector20(void), vector21(void), vector22(void), vector23(void), vector24(void),
    vector25(void), vector26(void), vector27(void), vector28(void), vector29(void),
    vector30(void), vector31(void);
extern const u8 irq_stubs[];

static void (*const exceptions[32])(void) = {
    vector0, vector1, vector2, vector3, vector4, vector5, vector6, vector7,
    vector8, vector9, vector10, vector11, vector12, vector13, vector14, vector15,
    vector16, vector17, vector18, vector19, vector20, vector21, vector22, vector23,
    vector24, vector25, vector26, vector27, vector28, vector29, vector30, vector31,
};

static void set_gate(int n, u64 a)
{
    idt[n] = (struct idt_gate){ a & 0xffff, 0x08, 0, 0x8e, (a >> 16) & 0xffff, a >> 32, 0 };
}

/* Remap the 8259s away from the exception vectors, then mask every line. */
static void pic_disable(void)
{
    outb(0x20, 0x11); outb(0xa0, 0x11);
    outb(0x21, VEC_PIC_BASE); outb(0xa1, VEC_PIC_BASE + 8);
    outb(0x21, 0x04); outb(0xa1, 0x02);
    outb(0x21, 0x01); outb(0xa1, 0x01);
    outb(0x21, 0xff); outb(0xa1, 0xff);
}

void trap_init(void)
{
    for (int i = 0; i < 32; i++)
        set_gate(i, (unsigned long)exceptions[i]);
    for (int i = 32; i < 256; i++)
        set_gate(i, (unsigned long)irq_stubs + (i - 32) * IRQ_STUB_SIZE);
    struct { u16 limit; u64 base; } __attribute__((packed)) desc = { sizeof(idt) - 1, (unsigned long)idt };
    asm volatile("lidt %0" : : "m"(desc));
    pic_disable();
}

/* Exceptions that push an error code: an interrupt on their vectors leaves a frame trap() cannot return from. */
#define ERROR_CODE_VECTORS ((1u << 8) | (1u << 10) | (1u << 11) | (1u << 12) | (1u << 13) | (1u << 14) \
                            | (1u << 17) | (1u << 21) | (1u << 29) | (1u << 30))

/*
 * A CPU exception is a crash. But a device can send an MSI with any vector (a
 * DMA write to 0xFEEx_xxxx: QEMU delivers one in compatibility format even with
 * interrupt remapping on), and one with an exception's vector arrives here. The
 * local APIC marks an interrupt in service and an exception not: that one is
 * counted as spurious and acknowledged, and the proxy goes on.
 */
void trap(struct trapframe *tf)
{
    u32 v = (u32)tf->vector;
    if (v < 32 && !(ERROR_CODE_VECTORS >> v & 1) && lapic_in_service(v)) {
        if (shared)
            shared->spurious_irqs++;
        lapic_eoi();
        return;
    }
    crash(tf, NULL);
}

/* Record the machine state where the host can read it, tell the host, and stop for good. */
void crash(const struct trapframe *tf, const char *msg)
{
    cli();
    if (tf)
        kprintf("proxy: exception %lu error %lx at rip %lx\n", tf->vector, tf->error_code, tf->rip);
    else
        kprintf("proxy: panic: %s\n", msg);
    if (shared) {
        struct proxy_crash *c = &shared->crash;
        memset(c, 0, sizeof(*c));
        if (tf) {
            c->vector = (u32)tf->vector;
            c->error_code = (u32)tf->error_code;
            c->rip = tf->rip; c->cs = tf->cs; c->rflags = tf->rflags; c->rsp = tf->rsp;
            c->rax = tf->rax; c->rbx = tf->rbx; c->rcx = tf->rcx; c->rdx = tf->rdx;
            c->rsi = tf->rsi; c->rdi = tf->rdi; c->rbp = tf->rbp;
            c->r8 = tf->r8; c->r9 = tf->r9; c->r10 = tf->r10; c->r11 = tf->r11;
            c->r12 = tf->r12; c->r13 = tf->r13; c->r14 = tf->r14; c->r15 = tf->r15;
            memcpy(c->code, (const void *)(unsigned long)tf->rip, sizeof(c->code));
            memcpy(c->stack, (const void *)(unsigned long)tf->rsp, sizeof(c->stack));
        } else {
            c->vector = PROXY_VECTOR_PANIC;
            c->rip = (unsigned long)__builtin_return_address(0);
            for (unsigned i = 0; msg[i] && i < sizeof(c->message) - 1; i++)
                c->message[i] = msg[i];
        }
        c->cr0 = rcr0(); c->cr2 = rcr2(); c->cr3 = rcr3(); c->cr4 = rcr4();
        proxy_crashed();
    }
    for (;;)
        asm volatile("cli; hlt");
}

/* The host's OP_CRASH lands here, so that tests can see a real CPU exception end to end. */
__attribute__((noinline)) void crash_on_purpose(u32 kind)
{
    volatile u32 zero = 0;
    switch (kind) {
    case PROXY_CRASH_INVALID_OPCODE:
        asm volatile("ud2");
        break;
    case PROXY_CRASH_DIVIDE:
        asm volatile("divl %1" : : "a"(1), "r"(zero), "d"(0));
        break;
    case PROXY_CRASH_GPF:
        asm volatile("mov %0, %%ds" : : "r"(0x38));   /* selector past the GDT's end */
        break;
    case PROXY_CRASH_PANIC:
        panic("crash_on_purpose: the host asked for a panic");
    }
}
