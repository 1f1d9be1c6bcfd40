"""Process measurements shared by the benchmarks and the quality harness: RSS from ``/proc/self/status``, its
high-water mark and how to reset it, and the CPU model for the tables."""

from __future__ import annotations

import platform


def status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (e.g. ``VmRSS``, ``VmHWM``, ``RssFile``); None where there is no /proc."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """The RSS high-water mark of this process (since start, or since the last :func:`reset_peak_rss`)."""
    kb = status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
