package main

// Listener hand-over between two relays with the same state_dir, for
// upgrades and restarts without systemd (or beside it): the running relay
// listens on state_dir/relay.sock (0600, same uid only). A new `relayctl
// serve` connects, receives the listening sockets (SCM_RIGHTS), builds its
// server on them and says "taken"; the old one then closes its copies of
// the sockets (the kernel accept queue lives on in the new process, so
// nothing is refused or reset), drains its connections and exits. Until
// "taken" the old relay keeps serving: a new one that fails to start
// changes nothing.
//
//	new → old: "relay-handover 1\n"
//	old → new: {"pid":N,"names":["https",...]}\n + one fd per name
//	new → old: "taken\n"   (or EOF: abandoned, the old one keeps serving)
//	old → new: "ok\n"      (the old one stopped accepting)

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relay-gw/relay/internal/config"
	"github.com/relay-gw/relay/relay"
)

const (
	handoverHello = "relay-handover 1\n"
	handoverTaken = "taken\n"
	handoverOK    = "ok\n"
	// handoverWait bounds how long the old relay waits for the new one to
	// build its server (certificates, BPF) before it gives up and keeps
	// serving alone.
	handoverWait = 2 * time.Minute
)

// handoverPath is the hand-over socket of the relays using stateDir.
func handoverPath(stateDir string) string { return filepath.Join(stateDir, "relay.sock") }

type handoverOffer struct {
	PID   int      `json:"pid"`
	Names []string `json:"names"` // one per passed fd, in order
}

// takeover is a hand-over in progress on the new relay's side.
type takeover struct {
	conn   *net.UnixConn
	oldPID int
	lns    inheritedListeners
}

// listenersFor returns the listeners a new relay starts with: systemd's
// (socket activation) or, when a relay with the same state_dir runs,
// that relay's (a takeover to commit once the new server is built).
// Neither: nil, nil, and the relay binds its own.
func listenersFor(cfg *config.Config, log *slog.Logger) (inheritedListeners, *takeover, error) {
	sd, err := systemdListeners(cfg)
	if err != nil {
		return nil, nil, err
	}
	if sd != nil {
		for _, name := range listenerNames {
			if ln := sd[name]; ln != nil {
				if want := listenAddr(cfg, name); !addrMatches(want, ln.Addr()) {
					log.Warn("socket activation: the socket from systemd is used, not listen."+name, "socket", ln.Addr(), "listen."+name, want)
				} else {
					log.Info("socket activation: listener from systemd", "name", name, "addr", ln.Addr())
				}
			}
		}
		return sd, nil, nil
	}
	to, err := requestTakeover(cfg, log)
	if err != nil || to == nil {
		return nil, nil, err
	}
	return to.lns, to, nil
}

func listenAddr(cfg *config.Config, name string) string {
	switch name {
	case "https":
		return cfg.Listen.HTTPS
	case "http":
		return cfg.Listen.HTTP
	default:
		return cfg.Listen.Metrics
	}
}

// requestTakeover asks a running relay for its listeners. nil, nil when
// none answers (no socket, a stale one): the relay starts normally.
func requestTakeover(cfg *config.Config, log *slog.Logger) (*takeover, error) {
	path := handoverPath(cfg.StateDir)
	c, err := net.DialTimeout("unix", path, 2*time.Second)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			log.Info("no relay answers on the hand-over socket: starting on fresh listeners", "socket", path, "err", err)
		}
		return nil, nil
	}
	uc := c.(*net.UnixConn)
	fail := func(err error) (*takeover, error) {
		uc.Close()
		return nil, err
	}
	if err := checkPeerUID(uc); err != nil {
		return fail(fmt.Errorf("take over from the running relay (%s): %w", path, err))
	}
	uc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(uc, handoverHello); err != nil {
		return fail(fmt.Errorf("take over from the running relay (%s): %w", path, err))
	}
	offer, fds, err := readOffer(uc)
	if err != nil {
		return fail(fmt.Errorf("take over from the running relay (%s): %w; stop it, or remove the socket if no relay runs", path, err))
	}
	to := &takeover{conn: uc, oldPID: offer.PID, lns: inheritedListeners{}}
	for i, fd := range fds {
		name := offer.Names[i]
		want := listenAddr(cfg, name)
		if !knownListener(name) || want == "off" || want == "" || to.lns[name] != nil {
			unix.Close(fd)
			continue
		}
		ln, err := listenerFromFD(fd, name)
		if err != nil {
			for _, fd := range fds[i+1:] {
				unix.Close(fd)
			}
			to.abort()
			return nil, fmt.Errorf("take over from the running relay: %w", err)
		}
		if !addrMatches(want, ln.Addr()) {
			log.Info("hand-over: listen."+name+" changed: binding the new address", "old", ln.Addr(), "new", want)
			ln.Close()
			continue
		}
		to.lns[name] = ln
	}
	uc.SetDeadline(time.Time{})
	log.Info("hand-over: took the listeners of the running relay; it stops accepting once this one runs", "pid", offer.PID, "listeners", len(to.lns))
	return to, nil
}

// readOffer reads the old relay's answer: one JSON line and its fds.
func readOffer(uc *net.UnixConn) (handoverOffer, []int, error) {
	var offer handoverOffer
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4*len(listenerNames)))
	var line []byte
	var fds []int
	for !strings.Contains(string(line), "\n") {
		n, oobn, _, _, err := uc.ReadMsgUnix(buf, oob)
		if oobn > 0 {
			msgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
			for _, m := range msgs {
				if got, err := unix.ParseUnixRights(&m); err == nil {
					fds = append(fds, got...)
				}
			}
			if perr != nil {
				err = errors.Join(err, perr)
			}
		}
		line = append(line, buf[:n]...)
		if err != nil {
			closeFDs(fds)
			return offer, nil, fmt.Errorf("read the listeners: %w", err)
		}
		if len(line) > len(buf) {
			break
		}
	}
	if err := json.Unmarshal(line, &offer); err != nil {
		closeFDs(fds)
		return offer, nil, fmt.Errorf("read the listeners: %w", err)
	}
	if len(offer.Names) != len(fds) {
		closeFDs(fds)
		return offer, nil, fmt.Errorf("read the listeners: %d names for %d sockets", len(offer.Names), len(fds))
	}
	for _, fd := range fds {
		unix.CloseOnExec(fd)
	}
	return offer, fds, nil
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// commit tells the old relay to stop accepting: this one serves now.
func (t *takeover) commit(log *slog.Logger) {
	if t == nil {
		return
	}
	defer t.conn.Close()
	t.conn.SetDeadline(time.Now().Add(30 * time.Second))
	_, err := io.WriteString(t.conn, handoverTaken)
	if err == nil {
		var line string
		line, err = bufio.NewReader(t.conn).ReadString('\n')
		if err == nil && line != handoverOK {
			err = fmt.Errorf("unexpected answer %q", line)
		}
	}
	if err != nil {
		// Both may now accept on the same sockets, which is harmless; the
		// old one is gone or will drain on SIGTERM.
		log.Warn("hand-over: the previous relay did not confirm that it stopped accepting", "pid", t.oldPID, "err", err)
		return
	}
	log.Info("hand-over done: the previous relay stopped accepting and drains its connections", "pid", t.oldPID)
}

// abort gives the listeners back: the old relay keeps serving.
func (t *takeover) abort() {
	if t == nil {
		return
	}
	t.lns.close()
	t.conn.Close()
}

// checkPeerUID refuses a peer that runs as another user.
func checkPeerUID(uc *net.UnixConn) error {
	rc, err := uc.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return fmt.Errorf("read peer credentials: %w", cerr)
	}
	if int(cred.Uid) != os.Getuid() {
		return fmt.Errorf("peer runs as uid %d, not %d: listeners are handed over only between relays of the same user (run relayctl serve as the user of the running relay)", cred.Uid, os.Getuid())
	}
	return nil
}

// handoverServer is the running relay's side: it offers srv's listeners
// to a new relay and, once that one took them, stops accepting and calls
// stop (Serve drains and returns).
type handoverServer struct {
	ln   *net.UnixListener
	path string
	ino  uint64
	srv  *relay.Server
	stop func()
	log  *slog.Logger
	once sync.Once
}

// serveHandingOver runs srv: it completes the takeover (if any) once srv
// accepts, and offers srv's listeners to the next relay. Serve's drain
// starts when ctx ends (SIGTERM) or once the listeners were handed over,
// in both cases only after the connections already accepted are past
// their ClientHello: the drain closes those that are not, which would
// reset a client that connected a moment before a restart. endCtx ends
// ctx (the relay's other work: ACME, the reload watch), so that a relay
// handed over stops renewing beside its successor.
func serveHandingOver(ctx context.Context, endCtx func(), cfg *config.Config, srv *relay.Server, to *takeover, log *slog.Logger) error {
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			endCtx()
			go func() {
				srv.StopAccepting()
				lim := cfg.Limits
				wait := min(lim.HelloTimeout.D()+time.Second, lim.DrainTimeout.D())
				wctx, wcancel := context.WithTimeout(sctx, wait)
				srv.WaitHellos(wctx)
				wcancel()
				cancel()
			}()
		})
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(sctx) }()
	go func() {
		select {
		case <-ctx.Done():
			stop()
		case <-sctx.Done():
		}
	}()
	to.commit(log)
	h := serveHandover(ctx, cfg, srv, stop, log)
	err := <-served
	if h != nil {
		h.close(true)
	}
	return err
}

// serveHandover listens on state_dir/relay.sock until ctx ends or the
// listeners were handed over. A relay that cannot listen there still
// serves; it just cannot be taken over.
func serveHandover(ctx context.Context, cfg *config.Config, srv *relay.Server, stop func(), log *slog.Logger) *handoverServer {
	path := handoverPath(cfg.StateDir)
	// Bind beside it and rename over it: a relay that is being replaced
	// keeps its (now unreachable) socket, and no client ever finds the
	// path missing.
	tmp := fmt.Sprintf("%s.%d", path, os.Getpid())
	os.Remove(tmp)
	// Chmod before the rename: relay.sock is never reachable with wider
	// permissions (and state_dir itself is 0700).
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		log.Warn("hand-over socket unavailable: a new relay cannot take over from this one (it would fail with address in use)", "socket", path, "err", err)
		return nil
	}
	ln.SetUnlinkOnClose(false)
	if err = os.Chmod(tmp, 0o600); err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		ln.Close()
		os.Remove(tmp)
		log.Warn("hand-over socket unavailable", "socket", path, "err", err)
		return nil
	}
	h := &handoverServer{ln: ln, path: path, srv: srv, stop: stop, log: log}
	if fi, err := os.Stat(path); err == nil {
		h.ino = fi.Sys().(*syscall.Stat_t).Ino
	}
	go func() {
		<-ctx.Done()
		h.close(true)
	}()
	go h.run()
	return h
}

// close stops offering; removeOwn also removes the socket file when it is
// still this relay's (a shutdown, not a hand-over).
func (h *handoverServer) close(removeOwn bool) {
	h.once.Do(func() {
		h.ln.Close()
		if fi, err := os.Stat(h.path); removeOwn && err == nil && fi.Sys().(*syscall.Stat_t).Ino == h.ino {
			os.Remove(h.path)
		}
	})
}

func (h *handoverServer) run() {
	for {
		c, err := h.ln.AcceptUnix()
		if err != nil {
			return
		}
		if h.handle(c) {
			return
		}
	}
}

// handle serves one hand-over request; true when the listeners were
// handed over (this relay is draining).
func (h *handoverServer) handle(c *net.UnixConn) bool {
	defer c.Close()
	if err := checkPeerUID(c); err != nil {
		h.log.Warn("hand-over request refused", "err", err)
		return false
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	if line, err := r.ReadString('\n'); err != nil || line != handoverHello {
		h.log.Warn("hand-over request refused: not a relay speaking this protocol", "got", line, "err", err)
		return false
	}
	offer := handoverOffer{PID: os.Getpid()}
	var fds []int
	defer func() { closeFDs(fds) }()
	for i, ln := range []net.Listener{h.srv.HTTPSListener(), h.srv.HTTPListener(), h.srv.MetricsListener()} {
		tl, ok := ln.(*net.TCPListener)
		if !ok || tl == nil {
			continue
		}
		// A plain dup (not TCPListener.File, whose Fd would make the
		// shared file description blocking); the socket stays in this
		// process's listener too until StopAccepting.
		fd, err := dupListener(tl)
		if err != nil {
			h.log.Warn("hand-over request refused", "err", err)
			return false
		}
		fds = append(fds, fd)
		offer.Names = append(offer.Names, listenerNames[i])
	}
	msg, _ := json.Marshal(offer)
	if _, _, err := c.WriteMsgUnix(append(msg, '\n'), unix.UnixRights(fds...), nil); err != nil {
		h.log.Warn("hand-over: send listeners", "err", err)
		return false
	}
	h.log.Info("hand-over: a new relay asked for the listeners; serving until it runs")
	c.SetDeadline(time.Now().Add(handoverWait))
	line, err := r.ReadString('\n')
	if err != nil || line != handoverTaken {
		h.log.Warn("hand-over abandoned by the new relay: this one keeps serving", "got", strings.TrimSpace(line), "err", err)
		return false
	}
	// The new relay accepts on the same sockets now: stop accepting here
	// (the accept queue is shared, nothing waiting in it is lost).
	h.close(false)
	h.srv.StopAccepting()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, handoverOK)
	h.log.Info("hand-over: the new relay serves; draining", "open_connections", h.srv.OpenConnections())
	h.stop()
	return true
}

func dupListener(tl *net.TCPListener) (int, error) {
	rc, err := tl.SyscallConn()
	if err != nil {
		return -1, err
	}
	nfd, derr := -1, error(nil)
	if err := rc.Control(func(fd uintptr) { nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, fmt.Errorf("dup listener: %w", derr)
	}
	return nfd, nil
}
