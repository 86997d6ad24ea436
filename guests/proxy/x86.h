/* x86.h - one-instruction wrappers, xv6 style. */
#ifndef X86_H
#define X86_H

#include "abi.h"

static inline u8 inb(u16 port) { u8 v; asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; asm volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; asm volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outb(u16 port, u8 v) { asm volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { asm volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { asm volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }

/* MMIO goes through these accessors only: one volatile access of exactly the width asked. */
#define MMIO(type, a) (*(volatile type *)(unsigned long)(a))
static inline u8 mmio_read8(u64 a) { return MMIO(u8, a); }
static inline u16 mmio_read16(u64 a) { return MMIO(u16, a); }
static inline u32 mmio_read32(u64 a) { return MMIO(u32, a); }
static inline u64 mmio_read64(u64 a) { return MMIO(u64, a); }
static inline void mmio_write8(u64 a, u8 v) { MMIO(u8, a) = v; }
static inline void mmio_write16(u64 a, u16 v) { MMIO(u16, a) = v; }
static inline void mmio_write32(u64 a, u32 v) { MMIO(u32, a) = v; }
static inline void mmio_write64(u64 a, u64 v) { MMIO(u64, a) = v; }

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}
static inline void pause(void) { asm volatile("pause"); }
static inline void mfence(void) { asm volatile("mfence" : : : "memory"); }
static inline void barrier(void) { asm volatile("" : : : "memory"); }
static inline void cli(void) { asm volatile("cli" : : : "memory"); }
/* sti's one-instruction shadow means no interrupt slips in before hlt. */
static inline void sti_hlt(void) { asm volatile("sti; hlt" : : : "memory"); }
static inline void sti(void) { asm volatile("sti" : : : "memory"); }
static inline u64 rcr0(void) { u64 v; asm volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline u64 rcr2(void) { u64 v; asm volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline u64 rcr3(void) { u64 v; asm volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline u64 rcr4(void) { u64 v; asm volatile("mov %%cr4, %0" : "=r"(v)); return v; }

#endif
