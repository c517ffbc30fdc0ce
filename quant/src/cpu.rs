//! CPU feature detection and the `GGPT_ISA` switch, in one place for the whole runtime: the
//! matmul kernels, the quantizer searches, f16 row conversion and (in `ggpt-models`) attention
//! all ask this module which instruction-set level to use.
//!
//! The level is chosen once per process: the best one the CPU reports at run time (never
//! `-C target-cpu`, so one binary runs everywhere), unless the environment variable `GGPT_ISA`
//! names a lower available one (`scalar`, `avx2`, `avx512`, `avx512vnni`, `amx`, `neon`,
//! `neondot`).
//! Tests and `ggpt` use it to compare a SIMD path against the scalar one.

use std::fmt;
use std::sync::OnceLock;

/// An instruction-set level the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust, the reference.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL/DQ (+ the AVX2 set), without VNNI.
    Avx512,
    /// AVX-512 with VNNI (`vpdpbusd`): the int8 dot-product instruction.
    Avx512Vnni,
    /// AVX-512 VNNI and AVX512-BF16 plus the AMX tile unit with bf16 products (`tdpbf16ps`),
    /// which prompts with F16 and BF16 weights use (`dot::amx`); everything else runs the
    /// AVX-512 VNNI kernels.
    Amx,
    /// aarch64 NEON (always present on aarch64).
    Neon,
    /// aarch64 NEON with the dot-product extension (`sdot`).
    NeonDot,
}

impl Isa {
    /// Every level, lowest first.
    pub const ALL: [Isa; 7] = [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Vnni,
        Isa::Amx,
        Isa::Neon,
        Isa::NeonDot,
    ];

    /// The name `GGPT_ISA` accepts.
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Amx => "amx",
            Isa::Neon => "neon",
            Isa::NeonDot => "neondot",
        }
    }

    /// Parse a `GGPT_ISA` value (case-insensitive, surrounding blanks ignored).
    pub fn from_name(s: &str) -> Option<Isa> {
        let s = s.trim().to_ascii_lowercase();
        Isa::ALL.into_iter().find(|i| i.name() == s)
    }

    /// Whether this CPU can run the level (detected at run time; `false` for the levels of
    /// another architecture).
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => Isa::Avx512.is_supported() && is_x86_feature_detected!("avx512vnni"),
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => {
                Isa::Avx512Vnni.is_supported()
                    && is_x86_feature_detected!("avx512bf16")
                    && amx_usable()
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => {
                std::arch::is_aarch64_feature_detected!("neon")
                    && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// This level as a [`Level`], if the CPU supports it.
    pub fn level(self) -> Option<Level> {
        self.is_supported().then_some(Level(self))
    }

    /// Whether code written for AVX2 + FMA + F16C may run at this level (every x86 SIMD level
    /// includes that set).
    pub const fn has_avx2(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni | Isa::Amx)
    }

    /// Whether code written for AVX-512 F/BW/VL/DQ (with AVX2 + FMA + F16C) may run at this
    /// level.
    pub const fn has_avx512(self) -> bool {
        matches!(self, Isa::Avx512 | Isa::Avx512Vnni | Isa::Amx)
    }
}

/// Whether the AMX tiles may be used: the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7), and the
/// kernel granted this process the tile data state. Linux keeps that state (8 KiB per thread)
/// off until a process asks for it with `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`;
/// a tile instruction before that kills the process with SIGILL. Asked once per process.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn amx_usable() -> bool {
    use std::sync::OnceLock;

    /// `arch_prctl` code that requests an extended state component.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    /// The XSAVE state component of the tile data.
    const XFEATURE_XTILEDATA: libc::c_long = 18;

    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        // Leaf 7 exists on every CPU with AVX-512, which the caller checked first.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (tile, bf16) = (leaf7.edx & (1 << 24) != 0, leaf7.edx & (1 << 22) != 0);
        if !(tile && bf16) {
            return false;
        }
        // SAFETY: arch_prctl with these arguments only changes which XSAVE components the
        // kernel lets this process use; it takes no pointers.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        r == 0
    })
}

/// No tile permission outside Linux: the kernel interface above is Linux's.
#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn amx_usable() -> bool {
    false
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An [`Isa`] this CPU was checked to support. Kernel lookups take a `Level` rather than an
/// `Isa`, which is what makes calling the (internally `unsafe`) SIMD kernels they return safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Level(Isa);

impl Level {
    /// The portable level, always available.
    pub const SCALAR: Level = Level(Isa::Scalar);

    /// The instruction set.
    pub const fn isa(self) -> Isa {
        self.0
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Levels this CPU supports, lowest first.
pub fn available_isas() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
}

/// The level in use: the best available, or the one `GGPT_ISA` names if that is available
/// (otherwise a warning on stderr and the best). Decided on first call, fixed for the process.
pub fn level() -> Level {
    static CHOSEN: OnceLock<Level> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let avail = available_isas();
        let best = *avail.last().unwrap_or(&Isa::Scalar);
        let chosen = match std::env::var("GGPT_ISA") {
            Ok(v) if !v.trim().is_empty() => match Isa::from_name(&v) {
                Some(i) if avail.contains(&i) => i,
                _ => {
                    eprintln!(
                        "ggpt: GGPT_ISA={v:?} is not available on this CPU/build (available: {}); using {best}",
                        avail.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
                    );
                    best
                }
            },
            _ => best,
        };
        Level(chosen)
    })
}

/// The instruction set in use ([`level`]).
pub fn isa() -> Isa {
    level().isa()
}

/// Whether AVX2 + FMA + F16C code may run: the chosen level includes that set (so
/// `GGPT_ISA=scalar` turns every explicit SIMD path off at once).
pub fn avx2() -> bool {
    isa().has_avx2()
}
