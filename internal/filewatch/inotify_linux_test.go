package filewatch

import (
	"encoding/binary"
	"testing"
)

// TestMatchUnaligned decodes events at an odd offset, where a cast to
// *unix.InotifyEvent would be an unaligned load (SIGBUS on MIPS).
func TestMatchUnaligned(t *testing.T) {
	ev := func(mask uint32, name string) []byte {
		n := (len(name) + 1 + 15) &^ 15
		if name == "" {
			n = 0
		}
		b := make([]byte, 16+n)
		binary.NativeEndian.PutUint32(b[0:], 1)
		binary.NativeEndian.PutUint32(b[4:], mask)
		binary.NativeEndian.PutUint32(b[12:], uint32(n))
		copy(b[16:], name)
		return b
	}
	for _, tc := range []struct {
		evs  [][]byte
		want bool
	}{
		{[][]byte{ev(2, "other")}, false},
		{[][]byte{ev(2, "other"), ev(2, "relay.yaml")}, true},
		{[][]byte{ev(0x4000, "")}, true}, // IN_Q_OVERFLOW
		{[][]byte{ev(2, "relay.yaml.swp")}, false},
	} {
		buf := []byte{0}
		for _, e := range tc.evs {
			buf = append(buf, e...)
		}
		if got := match(buf[1:], "relay.yaml"); got != tc.want {
			t.Errorf("%q: match = %v, want %v", buf[1:], got, tc.want)
		}
	}
}
