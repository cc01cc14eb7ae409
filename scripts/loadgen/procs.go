package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is a process the bench started, in its own process group so that
// its children (nginx workers) are measured and stopped with it.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string // file with its stdout and stderr
	done chan struct{}
}

var (
	procsMu sync.Mutex
	procs   = map[*proc]bool{}
)

// start runs argv with env added to the environment, output to logFile.
func start(name, logFile string, env []string, argv ...string) (*proc, error) {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	f, err := os.Create(logFile)
	if err != nil {
		return nil, fmt.Errorf("create log: %w", err)
	}
	defer f.Close()
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logFile, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	procsMu.Lock()
	procs[p] = true
	procsMu.Unlock()
	return p, nil
}

// startPiped is start with the child's stdout returned as a reader (for
// children that report "ready").
func startPiped(name string, argv ...string) (*proc, *bufio.Reader, error) {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, err
	}
	// An open stdin: `loadgen idle` holds its connections until a line
	// (or EOF) comes on it, so with /dev/null it let them go at once
	// and the idle-connection readings saw them closing.
	if _, err := cmd.StdinPipe(); err != nil {
		return nil, nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	r := bufio.NewReader(out)
	procsMu.Lock()
	procs[p] = true
	procsMu.Unlock()
	return p, r, nil
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop ends the process group: SIGTERM, then SIGKILL after a grace period.
func (p *proc) stop() {
	procsMu.Lock()
	delete(procs, p)
	procsMu.Unlock()
	pgid := p.cmd.Process.Pid
	syscall.Kill(-pgid, syscall.SIGTERM)
	waited := make(chan struct{})
	go func() {
		if p.log != "" {
			<-p.done
		} else {
			p.cmd.Wait()
		}
		close(waited)
	}()
	select {
	case <-waited:
	case <-time.After(3 * time.Second):
		syscall.Kill(-pgid, syscall.SIGKILL)
		<-waited
	}
	syscall.Kill(-pgid, syscall.SIGKILL) // children that outlived the leader
}

// stopAll stops every process still running (on exit or a signal).
func stopAll() {
	procsMu.Lock()
	var ps []*proc
	for p := range procs {
		ps = append(ps, p)
	}
	procsMu.Unlock()
	for _, p := range ps {
		p.stop()
	}
}

// tail returns the end of the process's log, for error messages.
func (p *proc) tail() string {
	if p.log == "" {
		return ""
	}
	b, _ := os.ReadFile(p.log)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(b)
}

// members lists the pids in the process group.
func (p *proc) members() []int {
	pgid := p.cmd.Process.Pid
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if f := statFields(pid); len(f) > 2 && f[2] == strconv.Itoa(pgid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// statFields returns /proc/PID/stat fields after the command name, so
// f[0] is the state (field 3 in proc(5)).
func statFields(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 > len(s) {
		return nil
	}
	return strings.Fields(s[i+2:])
}

// rssKB is VmRSS summed over the process group.
func (p *proc) rssKB() int64 { return p.status("VmRSS:") }

// status sums a kB field of /proc/PID/status (VmRSS:, RssAnon:, ...)
// over the process group. Shared pages of a multi-process proxy (nginx's
// master and workers) count once per process, as VmRSS does.
func (p *proc) status(field string) int64 {
	var sum int64
	for _, pid := range p.members() {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, field); ok {
				n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
				sum += n
			}
		}
	}
	return sum
}

// cpuSeconds is user+system CPU time of the process group so far.
func (p *proc) cpuSeconds() float64 {
	var sum float64
	for _, pid := range p.members() {
		f := statFields(pid)
		if len(f) < 13 {
			continue
		}
		ut, _ := strconv.ParseFloat(f[11], 64)
		st, _ := strconv.ParseFloat(f[12], 64)
		sum += (ut + st) / 100 // USER_HZ
	}
	return sum
}
