//go:build unix

package relay

import "syscall"

func umask(m int) int { return syscall.Umask(m) }
