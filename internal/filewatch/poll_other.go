//go:build !linux

package filewatch

import (
	"os"
	"time"
)

func start(abs string, c chan struct{}) (func(), error) {
	done := make(chan struct{})
	go func() {
		defer close(c)
		t := time.NewTicker(2 * time.Second)
		defer t.Stop()
		last := stamp(abs)
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if s := stamp(abs); s != last {
					last = s
					notify(c)
				}
			}
		}
	}()
	return func() { close(done) }, nil
}

func stamp(path string) [2]int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return [2]int64{-1, -1}
	}
	return [2]int64{fi.ModTime().UnixNano(), fi.Size()}
}
