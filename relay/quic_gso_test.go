package relay

import (
	"bytes"
	"net"
	"testing"
	"time"
)

// TestWriteTrain: a train of datagrams sent with one GSO send, or one by
// one once GSO is off, arrives as the same datagrams; a GRO reader gets
// them back as one train with its segment size.
func TestWriteTrain(t *testing.T) {
	for _, off := range []bool{false, true} {
		rx, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer rx.Close()
		tx, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Close()
		was := gsoOff.Load()
		gsoOff.Store(off)
		var train []byte
		for i := range 10 {
			train = append(train, bytes.Repeat([]byte{byte(i)}, 1200)...)
		}
		train = train[:len(train)-500] // a shorter last one
		to := rx.LocalAddr().(*net.UDPAddr).AddrPort()
		if err := writeTrain(tx, train, 1200, to); err != nil {
			t.Fatal(err)
		}
		gsoOff.Store(was)
		rx.SetReadDeadline(time.Now().Add(2 * time.Second))
		var got []byte
		buf := make([]byte, 65536)
		for len(got) < len(train) {
			n, err := rx.Read(buf)
			if err != nil {
				t.Fatalf("gso off=%v: %v after %d bytes", off, err, len(got))
			}
			if n != 1200 && n != 700 {
				t.Fatalf("gso off=%v: datagram of %d bytes", off, n)
			}
			got = append(got, buf[:n]...)
		}
		if !bytes.Equal(got, train) {
			t.Fatalf("gso off=%v: datagrams differ", off)
		}
	}
	// GRO: a reader with it gets a train and its segment size.
	rx, _ := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	defer rx.Close()
	enableGRO(rx)
	tx, _ := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	defer tx.Close()
	train := bytes.Repeat([]byte{7}, 3*1000)
	if err := writeTrain(tx, train, 1000, rx.LocalAddr().(*net.UDPAddr).AddrPort()); err != nil {
		t.Fatal(err)
	}
	rx.SetReadDeadline(time.Now().Add(2 * time.Second))
	total := 0
	for total < len(train) {
		err := readTrain(rx, func(b []byte, seg int) {
			total += len(b)
			if seg != 0 && seg != 1000 {
				t.Errorf("segment size %d", seg)
			}
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}
